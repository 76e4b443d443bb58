"""``kvtier bench --endpoint URL``: the multi-turn chat benchmark against a running OpenAI-compatible vLLM server.

    kvtier bench --endpoint http://127.0.0.1:8000 --preset small --rounds 3
    kvtier bench --endpoint https://gpu-host:8000 --api-key-env VLLM_API_KEY --model my-model --out results/gpu

The same workload as the engine mode (the preset's conversations, arrivals, think times), replayed by
kvtier_bench.endpoint.replay; metrics by kvtier_bench.stats; per-tier hits from the server's /metrics
(kvtier_bench.endpoint.metrics). Writes results.json, results.md, ttft_by_turn.png and hits_by_tier.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier_bench.endpoint.cli import api_key
from kvtier_bench.endpoint.client import Endpoint, EndpointError, EndpointURL, RemoteTokenizer, parse_endpoint
from kvtier_bench.endpoint.markdown import markdown
from kvtier_bench.endpoint.metrics import Samples, block_size, delta, kvtier_stats, parse, vllm_counters
from kvtier_bench.endpoint.replay import replay, reset_caches, warm_up
from kvtier_bench.endpoint.summary import summarize_endpoint
from kvtier_bench.main import Progress, _git_state, _overrides
from kvtier_bench.report import plots
from kvtier_bench.settings import BenchSettings, load_settings
from kvtier_bench.workload import Tokenizer, Workload, check_fits, generate, load_tokenizer
from kvtier.errors import ConfigError


@dataclass(frozen=True)
class ServerInfo:
    url: EndpointURL
    model: str
    max_model_len: int | None
    version: str | None
    block_size: int
    block_size_source: str
    metrics: bool


def scrape(ep: Endpoint) -> Samples | None:
    """The server's /metrics, parsed; None when it has none."""
    status, body = ep.call("GET", "/metrics")
    return parse(body.decode(errors="replace")) if status == 200 else None


def server_info(ep: Endpoint, model: str | None, default_block_size: int) -> ServerInfo:
    cards = ep.get_json("/v1/models").get("data") or []
    ids = [str(c.get("id")) for c in cards]
    if model is None:
        if not ids:
            raise EndpointError(f"{ep.url.label}/v1/models lists no model")
        model = ids[0]
    elif model not in ids:
        raise ConfigError(f"--model: the server serves {ids}, not {model!r}")
    card = cards[ids.index(model)]
    version = _version(ep)
    samples = scrape(ep)
    size = block_size(samples) if samples else None
    source = ("read from vllm:cache_config_info" if size else
              "not reported by the server: the preset's engine.block_size is assumed")
    max_len = card.get("max_model_len")
    return ServerInfo(ep.url, model, max_len if isinstance(max_len, int) else None, version,
                      size or default_block_size, source, samples is not None)


def _version(ep: Endpoint) -> str | None:
    status, body = ep.call("GET", "/version")
    try:
        data = json.loads(body) if status == 200 else {}
    except ValueError:
        return None
    return str(data["version"]) if isinstance(data, dict) and "version" in data else None


def make_tokenizer(directory: str | None, ep: Endpoint, model: str) -> tuple[Tokenizer, str]:
    if directory:
        return load_tokenizer(directory), f"the local tokenizer in `{directory}`"
    return RemoteTokenizer(ep, model), "the server's /tokenize"


def timed_round(ep: Endpoint, info: ServerInfo, workload: Workload, settings: BenchSettings, reset: str,
                progress: Progress) -> dict[str, Any]:
    """Reset, read the counters, replay, let the server record its last steps, read the counters again."""
    outcome = reset_caches(ep, reset)
    time.sleep(0.2)
    before = scrape(ep) or {}
    rnd: dict[str, Any] = {"reset": outcome, "loadavg_before": os.getloadavg()}
    rnd.update(replay(ep, info.model, workload, settings.timeout_s, progress.show))
    rnd["loadavg_after"] = os.getloadavg()
    time.sleep(1.0)  # the server counts a step's stats as it sends its outputs: give the last ones time
    after = scrape(ep) or {}
    rnd["kvtier_before"], rnd["kvtier_after"] = kvtier_stats(before), kvtier_stats(after)
    rnd["server_counters"] = delta(vllm_counters(before), vllm_counters(after)) if after else {}
    return rnd


def client_machine() -> str:
    return f"{os.cpu_count()} CPUs ({platform.machine()}, {platform.system()}), Python {platform.python_version()}"


def _plottable(report: dict[str, Any]) -> dict[str, Any]:
    """plots() needs a cached-token total; where the server gave none, only kvtier's known hits count."""
    rows = []
    for row in report["results"]:
        m = row.get("summary")
        if m is not None and m["cached_tokens"] is None:
            m = {**m, "cached_tokens": sum(m["hit_tokens_by_tier"].values())}
        rows.append({**row, "summary": m})
    return {**report, "results": rows}


def _settings_dict(settings: BenchSettings, model: str) -> dict[str, Any]:
    """The settings that apply to a server run (the engine, tier and configuration settings do not)."""
    full = settings.to_dict()
    return {"preset": full["preset"], "model": model, "workload": full["workload"], "rounds": full["rounds"],
            "timeout_s": full["timeout_s"]}


def build_report(argv: list[str], settings: BenchSettings, info: ServerInfo, extra: dict[str, Any],
                 workload: Workload, rounds: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    summary = summarize_endpoint(rounds, info.block_size)
    failures = [f for rnd in rounds for f in rnd["failures"]]
    error = f"{len(failures)} request(s) failed; first: {failures[0]['error']}" if failures else None
    row = {"name": info.url.label, "description": f"OpenAI-compatible server at {info.url.label}, model {info.model}",
           "status": "ok" if summary["requests"] else "failed", "error": error, "summary": summary, "check": None,
           "rounds": rounds, "check_requests": []}
    report: dict[str, Any] = {
        "mode": "endpoint",
        "command": shlex.join(["kvtier", "bench", *argv]),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": client_machine(),
        "git": _git_state(),
        "model_dir": info.model,
        "settings": _settings_dict(settings, info.model),
        "workload": {"requests": workload.num_requests},
        "endpoint": {"url": info.url.label, "model": info.model, "server_version": info.version,
                     "max_model_len": info.max_model_len, "block_size": info.block_size,
                     "block_size_source": info.block_size_source, "metrics": info.metrics, **extra},
        "results": [row],
    }
    report["plots"] = plots(_plottable(report), run_dir)
    (run_dir / "results.json").write_text(json.dumps(report, indent=1))
    (run_dir / "results.md").write_text(markdown(report))
    return report


def main_endpoint(args: argparse.Namespace, argv: list[str]) -> int:
    url = parse_endpoint(args.endpoint)
    ignored = [flag for flag, value in (("--configs", args.configs), ("--policies", args.policies),
                                        ("--keep-data", args.keep_data)) if value]
    if ignored:
        print(f"kvtier bench: {', '.join(ignored)} do not apply with --endpoint (ignored)", file=sys.stderr)
    overrides = _overrides(argparse.Namespace(**{**vars(args), "model": None}))  # --model: the served name here
    settings = load_settings(args.preset, args.config, overrides)
    ep = Endpoint(url, api_key(args.api_key_env), settings.timeout_s)
    try:
        info = server_info(ep, args.model, settings.engine.block_size)
        tokenizer, tokenizer_source = make_tokenizer(args.tokenizer, ep, info.model)
        workload = generate(settings.workload, tokenizer)
        if info.max_model_len:
            check_fits(workload, info.max_model_len)
        run_dir = Path(args.out or Path("results") / time.strftime("%Y%m%d-%H%M%S"))
        run_dir.mkdir(parents=True, exist_ok=True)
        warm = warm_up(ep, info.model, workload)
        progress = Progress(workload.num_requests * settings.rounds, not args.no_progress)
        rounds = []
        for index in range(settings.rounds):
            progress.phase(f"{url.label}: round {index + 1}/{settings.rounds}")
            rounds.append(timed_round(ep, info, workload, settings, args.reset, progress))
            progress.advance(workload.num_requests)
        progress.bar.close()
    finally:
        ep.close()
    resets = sorted({rnd["reset"] for rnd in rounds})
    extra = {"tokenizer": tokenizer_source, "token_ids": "streamed with return_token_ids", "warm_up": warm,
             "reset_mode": args.reset, "reset": "; ".join(resets)}
    report = build_report(argv, settings, info, extra, workload, rounds, run_dir)
    print(markdown(report))
    print(f"results: {run_dir}/results.md, results.json, {', '.join(report['plots'])}")
    row = report["results"][0]
    if row["error"] or row["status"] != "ok":
        print(f"kvtier bench: FAILED: {row['error'] or 'no request completed'}")
        return 1
    return 0
