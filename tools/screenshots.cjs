// `node tools/screenshots.cjs SPEC.json`: photograph pages of the MLflow UI with Debian's Chromium,
// driven by playwright-core (pinned in package-lock.json; it downloads no browser of its own).
// tools/screenshots.py writes the spec and serves the pages. The spec:
//   {"chromium": "/usr/bin/chromium", "width": 1280, "height": 800, "localStorage": {key: value},
//    "shots": [{"url": ..., "out": "x.png", "height": 800, "text": ["shown once rendered"],
//               "click": ["playwright selector, every match clicked"], "then": ["shown after the clicks"],
//               "top": "text scrolled to the top before the picture",
//               "frameText": ["inside the page's iframe"]}]}
// A page is photographed once every text it names is visible: the UI is a React app that renders
// after its API calls answer, so a fixed delay would be either slow or flaky.
"use strict";

const fs = require("node:fs");
const { chromium } = require("playwright-core");

const TIMEOUT_MS = 60_000;
// After the texts are visible: the tables' columns and charts fade in within a few hundred milliseconds.
const SETTLE_MS = 1_500;

async function shoot(context, spec, shot) {
  const page = await context.newPage();
  const visible = (text) =>
    page.getByText(text).filter({ visible: true }).first().waitFor({ state: "visible", timeout: TIMEOUT_MS });
  try {
    await page.setViewportSize({ width: spec.width, height: shot.height || spec.height });
    // Not "networkidle": the UI polls its server for as long as a page is open.
    await page.goto(shot.url, { waitUntil: "load", timeout: TIMEOUT_MS });
    for (const text of shot.text || []) await visible(text);
    for (const selector of shot.click || []) {
      const matches = page.locator(selector);
      const count = await matches.count();
      if (count === 0) throw new Error(`nothing matches ${selector} on ${shot.url}`);
      for (let i = 0; i < count; i++) await matches.nth(i).click({ timeout: TIMEOUT_MS });
    }
    for (const text of shot.then || []) await visible(text);
    // A click may have scrolled the page's own scrolling container: bring the heading back to the top.
    if (shot.top) {
      await page.getByText(shot.top).first().evaluate((element) => element.scrollIntoView({ block: "start" }));
    }
    for (const text of shot.frameText || []) {
      await page.frameLocator("iframe").first().getByText(text).first().waitFor({ state: "visible", timeout: TIMEOUT_MS });
    }
    await page.waitForTimeout(SETTLE_MS);
    await page.screenshot({ path: shot.out });
  } finally {
    await page.close();
  }
}

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const browser = await chromium.launch({
    executablePath: spec.chromium,
    // As root (CI, containers) Chromium refuses its sandbox; /dev/shm is small in containers.
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: spec.width, height: spec.height } });
    await context.addInitScript((entries) => {
      for (const [key, value] of entries) window.localStorage.setItem(key, value);
    }, Object.entries(spec.localStorage || {}));
    for (const shot of spec.shots) {
      await shoot(context, spec, shot);
      console.log(`screenshots: ${shot.out} <- ${shot.url}`);
    }
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(`screenshots: ${error.stack || error}`);
  process.exit(1);
});
