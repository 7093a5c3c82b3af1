"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all) and print their tables.

`python -m benchmarks NAME --option ...` runs one benchmark with its own options (`--help` lists them).
"""

from __future__ import annotations

import importlib
import sys

# Each module exposes main(argv) -> int and prints its own table.
BENCHMARKS = ("generate", "train", "serve", "drift", "loop", "storage", "retention")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    split = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names, options = args[:split] or list(BENCHMARKS), args[split:]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    if options and len(names) != 1:
        print(f"options {options} need exactly one benchmark name before them, e.g. "
              f"`python -m benchmarks loop --months 3`", file=sys.stderr)
        return 2
    status = 0
    for name in names:
        print(f"\n=== benchmark: {name} ===", flush=True)
        status |= importlib.import_module(f"benchmarks.{name}").main(options)
    return status


if __name__ == "__main__":
    sys.exit(main())
