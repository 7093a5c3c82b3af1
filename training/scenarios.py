"""Named, seeded scenarios of card traffic that changes month by month, with labels that arrive late.

A scenario is a sequence of months; each month is a batch of labelled transactions with timestamps,
drawn by `training.generate` (the same classes and overlap as the reference file) with the month's
changes applied. Four kinds of change compose, each sized in units a reader understands:

- covariate drift of legitimate traffic: every legitimate `Amount` moves by `amount_shift` dollars,
  and the V columns `v_features` by `v_shift` standard deviations of the legitimate column; from
  `covariate_month`, at once (`covariate_ramp` 0) or growing linearly to full size over that many
  months. With `covariate_scope` "all" frauds move too (a change of the whole population, such as
  inflation; `monitoring.power` measures the drift check that way);
- concept drift: from `pattern_month`, a share of the frauds (`pattern_share`, growing by
  `pattern_growth` a month up to `pattern_max`) follows a new pattern. Those frauds look like
  legitimate traffic, except that the columns `pattern_features` move by `pattern_shift` standard
  deviations in a direction no earlier fraud went. A forest trained on earlier months has only seen
  legitimate rows there, so it scores them low. The fraud rate is unchanged: they replace old frauds;
- prevalence shift: from `prevalence_month` the fraud rate is `prevalence_rate` percent;
- nothing: `stable`, the control.

Month 0 is the reference period (no change, whatever the scenario); months 1..`months` follow. Month m
covers the `MONTH_DAYS` days from `start + (m - 1) * MONTH_DAYS` days; each row's `ts` is an epoch time
inside its month. `month_frame` returns the rows with their `kind` (see `KINDS`) for analysis.

Labels arrive as a bank's chargeback feed delivers them (`LabelDelay`): a fraud's label a random
number of days after the transaction (uniform over `delay_min_days`..`delay_max_days` by default), a
share of frauds never; a legitimate row (or an unreported fraud) is known to be legitimate only once
`maturity_days` have passed without a chargeback.

`python -m training.scenarios --scenario new-pattern --months 6 --rows 50000 --out DIR` writes one
CSV per month; every parameter has a flag (see --help), so unseen scenarios can be run as well as the
shipped ones (`SCENARIOS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from common.features import AmountScaler
from common.schema import FEATURES, LABEL, V_COLUMNS
from training import generate as gen

MONTH_DAYS = 30
DAY = 86_400.0
NEW_PATTERN_FRAUD = "new_pattern_fraud"
KINDS = (gen.LEGIT, gen.LEGIT_OUTLIER, gen.FRAUD, gen.CAMOUFLAGED_FRAUD, NEW_PATTERN_FRAUD)
# V columns where the public file's frauds and legitimate rows have (nearly) the same mean: a new
# pattern that moves there goes where no earlier fraud went.
QUIET_COLUMNS = tuple(c for c, m in zip(V_COLUMNS, gen.FRAUD_MOMENTS[:, 0], strict=True) if abs(m) <= 0.3)
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
DELAY_DISTRIBUTIONS = ("uniform", "triangular")
COVARIATE_SCOPES = ("legit", "all")


class ScenarioError(ValueError):
    """A scenario parameter is out of range; the message names it."""


@dataclass(frozen=True)
class LabelDelay:
    """When each label becomes known, as a bank's chargeback feed behaves.

    delay_min_days, delay_max_days: a reported fraud's label arrives this many days after the
        transaction, drawn from `distribution` ('uniform', or 'triangular' peaking at `delay_mode_days`).
    unreported: share of frauds never reported; they look legitimate once mature.
    maturity_days: a row with no chargeback this many days after the transaction counts as
        legitimate. At least `delay_max_days`, so that every reported fraud arrives before it.
    """

    delay_min_days: float = 30.0
    delay_max_days: float = 90.0
    distribution: str = "uniform"
    delay_mode_days: float = 45.0
    unreported: float = 0.10
    maturity_days: float = 90.0

    def validate(self) -> None:
        """Raises ScenarioError naming the first value out of range."""
        checks = [
            (0.0 <= self.delay_min_days <= self.delay_max_days,
             f"delay_min_days ({self.delay_min_days}) must be within [0, delay_max_days={self.delay_max_days}]"),
            (self.distribution in DELAY_DISTRIBUTIONS,
             f"distribution must be one of {DELAY_DISTRIBUTIONS}, got {self.distribution!r}"),
            (self.distribution != "triangular" or self.delay_min_days <= self.delay_mode_days <= self.delay_max_days,
             f"delay_mode_days ({self.delay_mode_days}) must be within [delay_min_days, delay_max_days]"),
            (0.0 <= self.unreported <= 1.0, f"unreported must be within [0, 1], got {self.unreported}"),
            (self.maturity_days >= self.delay_max_days,
             f"maturity_days ({self.maturity_days}) must be at least delay_max_days ({self.delay_max_days}): "
             "a row must not count as legitimate before its chargeback can arrive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ScenarioError(message)

    def known_at(self, ts: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(when each row's label becomes known, the label the feed then gives) for rows at `ts`.

        A reported fraud is known as 1 at ts + its delay; a legitimate row, and an unreported fraud,
        as 0 at ts + maturity_days.
        """
        ts = np.asarray(ts, dtype=np.float64)
        label = np.asarray(label, dtype=np.int64)
        n = len(ts)
        if self.distribution == "uniform":
            delay = rng.uniform(self.delay_min_days, self.delay_max_days, n)
        else:
            delay = rng.triangular(self.delay_min_days, self.delay_mode_days, self.delay_max_days, n) \
                if self.delay_max_days > self.delay_min_days else np.full(n, self.delay_min_days)
        reported = (label == 1) & (rng.random(n) >= self.unreported)
        known = np.where(reported, ts + delay * DAY, ts + self.maturity_days * DAY)
        return known, reported.astype(np.int64)


@dataclass(frozen=True)
class Scenario:
    """A named sequence of months of traffic; see the module docstring for each change.

    Shares are fractions (0.3 = 30 %) except `fraud_rate` and `prevalence_rate`, which are percent.
    A change's month is the first month it applies to; 0 means the change is off.
    """

    name: str = "custom"
    months: int = 6
    rows: int = 50_000
    seed: int = 0
    fraud_rate: float = 100 * gen.DEFAULT_FRAUD_RATE
    start: float = DEFAULT_START
    # covariate drift of legitimate traffic
    covariate_month: int = 0
    covariate_ramp: int = 0
    amount_shift: float = 0.0
    v_shift: float = 0.0
    v_features: tuple[str, ...] = ("V1", "V2", "V3", "V4", "V5")
    covariate_scope: str = "legit"
    # concept drift: a new fraud pattern
    pattern_month: int = 0
    pattern_share: float = 0.5
    pattern_growth: float = 0.1
    pattern_max: float = 0.8
    pattern_shift: float = 3.0
    pattern_features: tuple[str, ...] = ("V13", "V15", "V22", "V24", "V26")
    # prevalence shift
    prevalence_month: int = 0
    prevalence_rate: float = 100 * gen.DEFAULT_FRAUD_RATE
    # labels
    delay: LabelDelay = LabelDelay()

    def validate(self) -> Scenario:
        """Self, checked. Raises ScenarioError naming the first value out of range."""
        checks = [
            (self.months >= 1, f"months must be at least 1, got {self.months}"),
            (self.rows >= 1, f"rows must be at least 1, got {self.rows}"),
            (0.0 <= self.fraud_rate <= 100.0,
             f"fraud_rate must be a percentage within [0, 100], got {self.fraud_rate}"),
            (0.0 <= self.prevalence_rate <= 100.0,
             f"prevalence_rate must be a percentage within [0, 100], got {self.prevalence_rate}"),
            (self.covariate_ramp >= 0, f"covariate_ramp must be 0 (sudden) or more months, got {self.covariate_ramp}"),
            (self.covariate_scope in COVARIATE_SCOPES,
             f"covariate_scope must be one of {COVARIATE_SCOPES}, got {self.covariate_scope!r}"),
            (all(0 <= m for m in (self.covariate_month, self.pattern_month, self.prevalence_month)),
             "change months must be 0 (off) or a month number"),
            (0.0 <= self.pattern_share <= 1.0 and 0.0 <= self.pattern_max <= 1.0,
             f"pattern_share and pattern_max must be within [0, 1], got {self.pattern_share}, {self.pattern_max}"),
            (self.pattern_growth >= 0.0, f"pattern_growth must be 0 or more, got {self.pattern_growth}"),
            (self.pattern_shift >= 0.0,
             f"pattern_shift must be 0 or more standard deviations, got {self.pattern_shift}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ScenarioError(message)
        for option, names in (("v_features", self.v_features), ("pattern_features", self.pattern_features)):
            unknown = [f for f in names if f not in V_COLUMNS]
            if unknown or not names:
                raise ScenarioError(f"{option} must name V columns (V1..V28), got {list(names)}")
        self.delay.validate()
        return self

    def with_options(self, **options) -> Scenario:
        """A copy with some parameters changed (label-delay ones by their own names)."""
        delay_fields = {f.name for f in dataclasses.fields(LabelDelay)}
        delay = {k: v for k, v in options.items() if k in delay_fields}
        rest = {k: v for k, v in options.items() if k not in delay_fields}
        return dataclasses.replace(self, **rest, delay=dataclasses.replace(self.delay, **delay))

    # --- the month's changes ------------------------------------------------------------------------

    def covariate_size(self, month: int) -> float:
        """How much of the covariate drift applies in `month` (0..1)."""
        if not self.covariate_month or month < self.covariate_month:
            return 0.0
        if self.covariate_ramp == 0:
            return 1.0
        return min(1.0, (month - self.covariate_month + 1) / self.covariate_ramp)

    def pattern_fraction(self, month: int) -> float:
        """The share of the month's frauds that follow the new pattern."""
        if not self.pattern_month or month < self.pattern_month:
            return 0.0
        return min(self.pattern_max, self.pattern_share + self.pattern_growth * (month - self.pattern_month))

    def fraud_percent(self, month: int) -> float:
        """The month's fraud rate, in percent."""
        if self.prevalence_month and month >= self.prevalence_month:
            return self.prevalence_rate
        return self.fraud_rate

    def month_start(self, month: int) -> float:
        """Epoch seconds at which `month` begins (month 0 is the period just before month 1)."""
        return self.start + (month - 1) * MONTH_DAYS * DAY

    def month_end(self, month: int) -> float:
        return self.month_start(month + 1)

    def describe(self) -> list[str]:
        """One line per change, in the units of its parameters."""
        lines = [f"{self.name}: {self.months} months of {self.rows:,} transactions, fraud rate "
                 f"{self.fraud_rate:.3g} %, seed {self.seed}"]
        if self.covariate_month:
            how = "at once" if self.covariate_ramp == 0 else f"over {self.covariate_ramp} months"
            whose = "legitimate" if self.covariate_scope == "legit" else "every"
            lines.append(f"  covariate drift from month {self.covariate_month} ({how}): {whose} Amount "
                         f"{self.amount_shift:+g} $, {', '.join(self.v_features)} {self.v_shift:+g} sd")
        if self.pattern_month:
            lines.append(f"  new fraud pattern from month {self.pattern_month}: {self.pattern_share:.0%} of frauds, "
                         f"+{self.pattern_growth:.0%} a month up to {self.pattern_max:.0%}; "
                         f"{', '.join(self.pattern_features)} {self.pattern_shift:+g} sd")
        if self.prevalence_month:
            lines.append(f"  fraud rate {self.prevalence_rate:.3g} % from month {self.prevalence_month}")
        if len(lines) == 1:
            lines.append("  no change (control)")
        d = self.delay
        lines.append(f"  labels: frauds reported {d.delay_min_days:g}-{d.delay_max_days:g} days later "
                     f"({d.distribution}), {d.unreported:.0%} never; legitimate once {d.maturity_days:g} days old")
        return lines


SCENARIOS: dict[str, Scenario] = {
    "stable": Scenario(name="stable"),
    # Inflation and a new merchant mix: legitimate amounts and five V columns move, over three months.
    "covariate": Scenario(name="covariate", covariate_month=1, covariate_ramp=3, amount_shift=25.0, v_shift=0.5),
    # Fraudsters change tactics in month 3: half the frauds follow a pattern the first model never saw.
    "new-pattern": Scenario(name="new-pattern", pattern_month=3),
    # All three at once: gradual covariate drift, a new pattern from month 3, a fraud rate that doubles in month 4.
    "mixed": Scenario(name="mixed", covariate_month=2, covariate_ramp=4, amount_shift=10.0, v_shift=0.2,
                      pattern_month=3, prevalence_month=4, prevalence_rate=2 * 100 * gen.DEFAULT_FRAUD_RATE),
}


def named(name: str, **options) -> Scenario:
    """A shipped scenario, with any parameter changed.

    Raises:
        ScenarioError: unknown name, unknown option, or a value out of range.
    """
    if name not in SCENARIOS:
        raise ScenarioError(f"scenario {name!r} is unknown; expected one of {sorted(SCENARIOS)}")
    known = {f.name for f in dataclasses.fields(Scenario)} | {f.name for f in dataclasses.fields(LabelDelay)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ScenarioError(f"unknown scenario option(s) {unknown}")
    return SCENARIOS[name].with_options(**options).validate()


# --- drawing a month -----------------------------------------------------------------------------------


def _new_pattern_v(rng: np.random.Generator, n: int, scenario: Scenario) -> np.ndarray:
    """Frauds that look legitimate except on `pattern_features`, moved up by `pattern_shift` sd."""
    v = gen.legit_v(rng, n, gen.NO_OVERLAP)[0]
    columns = [V_COLUMNS.index(f) for f in scenario.pattern_features]
    # The shift varies from row to row (0.75x to 1.25x), as a tactic's execution does.
    strength = scenario.pattern_shift * rng.uniform(0.75, 1.25, size=(n, 1))
    v[:, columns] += strength * gen.LEGIT_MOMENTS[columns, 1]
    return v


def month_frame(scenario: Scenario, month: int, rows: int | None = None) -> pd.DataFrame:
    """The month's transactions, in time order: `ts` (epoch seconds), V1..V28, `Amount`, `Class`, `kind`.

    The same scenario, month and row count always give the same rows. Month 0 is the reference
    period, with no change.

    Raises:
        ScenarioError: the month is outside 0..months.
    """
    if not 0 <= month <= scenario.months:
        raise ScenarioError(f"month must be within 0..{scenario.months} for scenario {scenario.name!r}, got {month}")
    rows = scenario.rows if rows is None else rows
    rng = np.random.default_rng([scenario.seed, month, 17])
    n_fraud = round(rows * scenario.fraud_percent(month) / 100)
    frame = gen.draw(rng, rows - n_fraud, n_fraud, gen.Overlap(), span=MONTH_DAYS * DAY)

    legit = frame[LABEL].to_numpy() == 0
    size = scenario.covariate_size(month)
    if size:
        moved = legit if scenario.covariate_scope == "legit" else np.ones(len(frame), dtype=bool)
        columns = list(scenario.v_features)
        sds = gen.LEGIT_MOMENTS[[V_COLUMNS.index(f) for f in columns], 1]
        frame.loc[moved, columns] += size * scenario.v_shift * sds
        frame.loc[moved, "Amount"] = np.maximum(frame.loc[moved, "Amount"] + size * scenario.amount_shift, 0.0).round(2)

    share = scenario.pattern_fraction(month)
    if share:
        frauds = np.flatnonzero(~legit)
        chosen = frauds[rng.random(frauds.size) < share]
        frame.loc[chosen, list(V_COLUMNS)] = _new_pattern_v(rng, chosen.size, scenario)
        # Amounts like legitimate purchases: the tactic hides in ordinary baskets.
        frame.loc[chosen, "Amount"] = gen.amounts(rng, chosen.size, False)
        frame.loc[chosen, "kind"] = NEW_PATTERN_FRAUD

    frame.insert(0, "ts", scenario.month_start(month) + frame.pop("Time"))
    order = np.lexsort((rng.random(len(frame)), frame["ts"].to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def model_inputs(frame: pd.DataFrame, scaler: AmountScaler) -> pd.DataFrame:
    """The model's 29 FEATURES (Amount scaled with the stored scaler) and `Class`, from `month_frame` rows."""
    out = frame[list(V_COLUMNS)].copy()
    out["Amount_scaled"] = scaler.transform(frame["Amount"].to_numpy())
    out[LABEL] = frame[LABEL].to_numpy()
    return out[[*FEATURES, LABEL]]


def inputs(scenario: Scenario, month: int, scaler: AmountScaler, rows: int | None = None) -> pd.DataFrame:
    """`model_inputs(month_frame(scenario, month, rows), scaler)`: the month as the model sees it."""
    return model_inputs(month_frame(scenario, month, rows), scaler)


def labels(scenario: Scenario, frame: pd.DataFrame, month: int) -> pd.DataFrame:
    """The chargeback feed for `month_frame(scenario, month)`: `known_at` (epoch seconds) and the
    `label` the feed gives then (1 reported fraud, 0 legitimate or never reported), per row."""
    rng = np.random.default_rng([scenario.seed, month, 29])
    known, label = scenario.delay.known_at(frame["ts"].to_numpy(), frame[LABEL].to_numpy(), rng)
    return pd.DataFrame({"known_at": known, "label": label}, index=frame.index)


# --- the command line ------------------------------------------------------------------------------------

# Flag name -> (type, help). Every Scenario and LabelDelay field but `name` and `delay`.
_HELP = {
    "months": "months after the reference period",
    "rows": "transactions per month",
    "seed": "random seed; the same seed gives the same months",
    "fraud_rate": "fraud rate in percent (0.172 as in the public file)",
    "start": "epoch seconds at which month 1 starts",
    "covariate_month": "first month of covariate drift (0: none)",
    "covariate_ramp": "months over which it grows to full size (0: at once)",
    "amount_shift": "dollars added to every legitimate Amount at full size",
    "v_shift": "standard deviations added to v_features of legitimate rows at full size",
    "v_features": "comma-separated V columns that covariate drift moves",
    "covariate_scope": "rows covariate drift moves: legit, or all (frauds too)",
    "pattern_month": "first month of the new fraud pattern (0: none)",
    "pattern_share": "share of frauds following it in its first month (0..1)",
    "pattern_growth": "share added each month after",
    "pattern_max": "largest share",
    "pattern_shift": "standard deviations by which it moves pattern_features",
    "pattern_features": "comma-separated V columns the new pattern moves",
    "prevalence_month": "first month of the new fraud rate (0: none)",
    "prevalence_rate": "the new fraud rate in percent",
    "delay_min_days": "shortest chargeback delay in days",
    "delay_max_days": "longest chargeback delay in days",
    "distribution": f"chargeback delay distribution: {', '.join(DELAY_DISTRIBUTIONS)}",
    "delay_mode_days": "most likely delay (triangular)",
    "unreported": "share of frauds never reported (0..1)",
    "maturity_days": "days without a chargeback after which a row counts as legitimate",
}


def _features(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in str(text).split(",") if f.strip())


def add_scenario_arguments(parser: argparse.ArgumentParser, *, default: str = "stable",
                           defaults: dict | None = None) -> None:
    """Add --scenario and one flag per scenario parameter (both --v-shift and --v_shift spellings).

    Unset flags keep the named scenario's values, or `defaults` (a caller's own, e.g. fewer rows);
    read them back with `scenario_from_args`.
    """
    defaults = defaults or {}
    group = parser.add_argument_group("scenario", "a shipped scenario and any parameter changed")
    group.add_argument("--scenario", default=default, help=f"one of {', '.join(SCENARIOS)} (default {default})")
    fields = [f for f in dataclasses.fields(Scenario) if f.name not in ("name", "delay")]
    fields += list(dataclasses.fields(LabelDelay))
    kinds = {"int": int, "float": float, "str": str}
    for f in fields:
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        convert = _features if kind.startswith("tuple") else kinds[kind]
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        given = defaults.get(f.name)
        group.add_argument(*flags, dest=f"scenario_{f.name}", type=convert, default=given,
                           help=_HELP[f.name] + (f" (default {given})" if given is not None else ""))


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The scenario `add_scenario_arguments` flags describe.

    Raises:
        ScenarioError: unknown scenario or a value out of range.
    """
    options = {key.removeprefix("scenario_"): value for key, value in vars(args).items()
               if key.startswith("scenario_") and value is not None}
    return named(args.scenario, **options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.scenarios", description=__doc__.splitlines()[0])
    add_scenario_arguments(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="write month_00.csv .. month_NN.csv (ts, V1..V28, Amount, Class, kind, known_at, "
                             "label) here; without it, only describe the scenario")
    args = parser.parse_args(argv)
    try:
        scenario = scenario_from_args(args)
    except ScenarioError as exc:
        print(f"scenarios: {exc}", file=sys.stderr)
        return 2
    print("\n".join(scenario.describe()))
    if args.out is None:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for month in range(scenario.months + 1):
        frame = month_frame(scenario, month)
        frame = frame.join(labels(scenario, frame, month))
        path = args.out / f"month_{month:02d}.csv"
        frame.to_csv(path, index=False)
        kinds = frame["kind"].value_counts()
        print(f"month {month}: {len(frame):,} rows, {int(frame[LABEL].sum())} frauds "
              f"({int(kinds.get(NEW_PATTERN_FRAUD, 0))} new pattern) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
