"""The ``kvtier`` command: validate a config, inspect and prune stored blocks; more commands by entry point.

Other distributions add sub-commands through the ``kvtier.commands`` entry-point group (a ``main(argv) -> int``);
the benchmark harness (benchmarks/, ``kvtier-bench``) adds ``kvtier bench`` that way, so the runtime never
imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata

from kvtier.config import KVTierConfig
from kvtier.errors import KVTierError
from kvtier.units import format_size


def _validate(args: argparse.Namespace) -> int:
    cfg = KVTierConfig.from_yaml(args.file)  # builds each codec and policy once: bad settings fail here
    print(f"{args.file}: OK")
    for i, tier in enumerate(cfg.tiers):
        codec = tier.codec.name + ("+shuffle" if tier.codec.shuffle else "")
        print(f"  tiers[{i}] {tier.name}: {tier.kind}, {format_size(tier.capacity)}, codec {codec}, "
              f"policy {tier.policy.name}{', write-through' if tier.write_through else ''}")
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
    return 0


COMMAND_GROUP = "kvtier.commands"
# Commands that other distributions provide, with the install hint shown when one is missing.
KNOWN_PLUGINS = {"bench": "the benchmark harness: pip install -e ./benchmarks (scripts/setup.sh does)"}


def _plugin_commands() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=COMMAND_GROUP)}


def _run_plugin(name: str, argv: list[str]) -> int:
    entry = _plugin_commands().get(name)
    if entry is None:
        raise KVTierError(f"'kvtier {name}' is not installed; it comes with {KNOWN_PLUGINS.get(name, 'a plug-in')}")
    return int(entry.load()(argv))


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
    for name, func, text in (("inspect", _inspect, "show what a disk dir / bucket / Redis holds"),
                             ("gc", _gc, "prune stored blocks by age or size")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    for name in sorted(set(_plugin_commands()) | set(KNOWN_PLUGINS)):
        p = sub.add_parser(name, help=f"provided by {KNOWN_PLUGINS.get(name, 'a plug-in')} (see --help)",
                           add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, name=name: _run_plugin(name, args.rest))
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
