"""``novacron bench NAME``: the one entry point for every benchmark.

Benchmarks are the modules of ``novacron.bench`` (except helpers whose name
starts with ``_`` and ``report``); each exposes ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> Report``. They are imported only
when chosen, so the CLI stays quick to start.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import novacron.bench


def available() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(novacron.bench.__path__)
        if not m.name.startswith("_") and m.name != "report"
    )


def register(sub: argparse._SubParsersAction) -> None:
    names = available()
    p = sub.add_parser(
        "bench",
        help="run a benchmark and print figures beside a reference",
        description="Benchmarks: " + (", ".join(names) or "(none installed)")
        + ". Run 'novacron bench NAME --help' for a benchmark's options.",
    )
    p.add_argument("name", metavar="NAME", help="one of: " + ", ".join(names))
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def bench_parser(name: str) -> argparse.ArgumentParser:
    """The options of one benchmark (``novacron bench NAME --help``)."""
    module = importlib.import_module(f"novacron.bench.{name}")
    # EPILOG (optional): what the figures mean, after the options
    parser = argparse.ArgumentParser(prog=f"novacron bench {name}", description=module.DESCRIPTION,
                                     epilog=getattr(module, "EPILOG", None))
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    module.add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    names = available()
    if args.name not in names:
        print(f"novacron bench: unknown benchmark {args.name!r}; choose from: {', '.join(names)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"novacron.bench.{args.name}")
    bench_args = bench_parser(args.name).parse_args(args.rest)
    bench_args.settings = args.settings
    report = module.run(bench_args)
    report.print(json_output=bench_args.json)
    return 0
