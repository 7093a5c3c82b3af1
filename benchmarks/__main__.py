"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all) and print their tables."""

from __future__ import annotations

import importlib
import sys

# Each module exposes main(argv) -> int and prints its own table.
BENCHMARKS = ("generate", "train", "serve", "drift", "loop")


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    status = 0
    for name in names:
        print(f"\n=== benchmark: {name} ===", flush=True)
        status |= importlib.import_module(f"benchmarks.{name}").main([])
    return status


if __name__ == "__main__":
    sys.exit(main())
