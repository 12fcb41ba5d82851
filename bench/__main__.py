"""`python -m bench MODE ...`: the same as `baton bench MODE ...` (see bench.cli)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench.cli import __doc__ as CLI_DOC
from bench.cli import add_bench_commands


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the benchmark; the exit status."""
    parser = argparse.ArgumentParser(
        prog="baton bench", description=(CLI_DOC or "").split("\n\n")[0],
    )
    add_bench_commands(parser)
    args = parser.parse_args(argv)
    from bench.commands import BenchUsageError, run_bench

    try:
        return run_bench(args)
    except BenchUsageError as exc:
        print(f"baton bench {args.bench_mode}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
