"""The ``kvtier`` command: validate a config, run the benchmark, inspect and prune stored blocks."""

from __future__ import annotations

import argparse
import json
import sys

from kvtier.config import KVTierConfig
from kvtier.errors import KVTierError
from kvtier.units import format_size


def _validate(args: argparse.Namespace) -> int:
    from kvtier.policies import make_policy

    cfg = KVTierConfig.from_yaml(args.file)
    for i, tier in enumerate(cfg.tiers):
        make_policy(tier.policy, f"{args.file}: tiers[{i}].policy")
    print(f"{args.file}: OK")
    for i, tier in enumerate(cfg.tiers):
        codec = tier.codec.name + ("+shuffle" if tier.codec.shuffle else "")
        print(f"  tiers[{i}] {tier.name}: {tier.kind}, {format_size(tier.capacity)}, codec {codec}, "
              f"policy {tier.policy.name}{', write-through' if tier.write_through else ''}")
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kvtier.bench.main import main as bench_main

    return bench_main(args.rest)


def _inspect(args: argparse.Namespace) -> int:
    from kvtier.inspect import main as inspect_main

    return inspect_main(["inspect", *args.rest])


def _gc(args: argparse.Namespace) -> int:
    from kvtier.inspect import main as inspect_main

    return inspect_main(["gc", *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a config file and print the tiers it defines")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="also print the resolved config")
    p.set_defaults(func=_validate)
    for name, func, text in (("bench", _bench, "run the multi-turn chat benchmark (see --help)"),
                             ("inspect", _inspect, "show what a disk dir / bucket / Redis holds"),
                             ("gc", _gc, "prune stored blocks by age or size")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse's REMAINDER does not take a leading option ("kvtier bench --preset small"): pass those on.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "rest"):
        args.rest = extra + args.rest
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except KVTierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
