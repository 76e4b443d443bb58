"""Engines in their own processes for the micro-benchmarks under ``benchmarks/``, and paired-ratio statistics.

A benchmark script runs itself as ``script --worker SPEC`` (one vLLM engine per process, commands on stdin, one
``RESULT <json>`` line per command). ``EngineProcess`` keeps the engine stopped (SIGSTOP) except while it runs a
command, so idle engines take no CPU from the one being measured; its OMP threads are bound to the cores this
process may use. ``allocator_env`` gives every engine, plain vLLM included, the glibc allocator settings
kvtier's worker applies to its own process (they speed up vLLM's own CPU work too, so a comparison without them
credits the connector with the allocator's gain).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvtier.hostmem import PREFAULT_THREAD

BLOCK = 128  # vLLM's block size in the micro-benchmarks
ALLOCATORS = {"kvtier": "the settings kvtier's connector applies (GLIBC_TUNABLES), plain included",
              "default": "glibc's defaults (kvtier's engines: the connector's settings)"}


def add_allocator_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allocator", choices=sorted(ALLOCATORS), default="kvtier",
                        help="glibc allocator settings of every engine: kvtier's worker's (default) or glibc's")


def allocator_env(choice: str) -> dict[str, str]:
    """The environment that gives an engine process ``choice``'s allocator settings from its start."""
    if choice == "default":
        return {}
    from kvtier.config import ConnectorConfig
    from kvtier.hostmem import glibc_tunables

    return {"GLIBC_TUNABLES": glibc_tunables(int(ConnectorConfig().keep_freed_memory))}


def prompt(seed: int, length: int) -> list[int]:
    """``length`` token ids drawn from ``seed``: the same prompt in every engine, no special ids."""
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(length)]


def compute_dtype() -> str:
    """The dtype the benchmarks run their models in: ``bfloat16`` where this machine computes it natively (a GPU,
    AVX512-BF16 or AMX on x86, BF16 on ARM), else ``float32``. Without native support bf16 matrix products are
    emulated: on an AVX2-only 2-core machine a 2k-token prefill of the base model took 42 s in bf16 (1.5 s on one
    with native bf16) and torch's bf16 GEMM ran 7x slower than its fp32 one, so a bf16 run there measures the
    emulation, not the KV cache. ``KVTIER_BENCH_DTYPE`` overrides the choice."""
    chosen = os.environ.get("KVTIER_BENCH_DTYPE")
    if chosen:
        return chosen
    import torch

    caps = torch.cpu.get_capabilities()
    native = torch.cuda.is_available() or any(caps.get(flag, False) for flag in ("avx512_bf16", "amx_bf16", "bf16"))
    return "bfloat16" if native else "float32"


def kv_scale() -> int:
    """KV bytes per value of ``compute_dtype()`` over the 2 of bf16: the factor the benchmarks apply to the KV
    spaces and tier capacities they give for 16-bit KV, so the same tokens fit whatever the dtype."""
    return {"float32": 2, "float": 2}.get(compute_dtype(), 1)


def cpu_list() -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def wait_for_startup_work() -> None:
    """Wait for kvtier's start-up work in this (engine) process: its DRAM pools faulted in (kvtier/tiers/dram.py).
    A deployment does it while vLLM loads and warms up; a benchmark waits, so it does not run beside rep 1."""
    for thread in threading.enumerate():
        if thread.name.startswith(PREFAULT_THREAD):
            thread.join()


class EngineProcess:
    def __init__(self, name: str, script: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.name = name
        full = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", cpu_list()),
                    VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1", **(env or {}))
        # kept when the engine fails (the error names it), removed by close() otherwise
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"kvtier-{name}-", suffix=".log", delete=False)
        self.failed = False
        self.proc = subprocess.Popen([sys.executable, script, "--worker", json.dumps(spec)], env=full, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True)

    def _line(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        self.log.flush()
        self.failed = True
        raise RuntimeError(f"{self.name} exited; its log: {self.log.name}")

    def ready(self) -> None:
        """Wait for the worker's READY line (engine up, warm-up done), then stop it."""
        self._line("READY")
        self.pause()

    def run(self, command: str) -> Any:
        """Resume the engine, send one command line, return its RESULT (parsed JSON), stop it again."""
        assert self.proc.stdin is not None
        os.killpg(self.proc.pid, signal.SIGCONT)
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return json.loads(self._line("RESULT "))
        finally:
            self.pause()

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
        except ProcessLookupError:  # already gone
            pass
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if not self.failed:
            Path(self.log.name).unlink(missing_ok=True)


def run_interleaved(engines: Sequence[EngineProcess], reps: int, label: str,
                    describe: Callable[[Any], str]) -> dict[str, list[Any]]:
    """Start the engines one at a time (a starting engine's threads would slow another's start), then run rep
    ``i`` on every engine, the order rotating by one each rep; prints ``describe(result)`` per engine and rep.
    Closes the engines. Returns each engine's results, by name, in rep order."""
    raw: dict[str, list[Any]] = {engine.name: [] for engine in engines}
    try:
        for engine in engines:
            engine.ready()
        for rep in range(reps):
            for engine in list(engines[rep % len(engines):]) + list(engines[:rep % len(engines)]):
                raw[engine.name].append(engine.run(str(rep)))
            print(f"{label} {rep + 1}/{reps}: " + ", ".join(f"{name} {describe(results[-1])}"
                                                           for name, results in raw.items()), flush=True)
    finally:
        for engine in engines:
            engine.close()
    return raw


def geo_interval(ratios: list[float], seed: int = 0, draws: int = 4000) -> dict[str, Any]:
    """Geometric mean of paired ratios and its 95% percentile-bootstrap interval."""
    logs = [math.log(r) for r in ratios]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choice(logs) for _ in logs) for _ in range(draws))
    return {"ratio": round(math.exp(statistics.fmean(logs)), 4),
            "ci95": [round(math.exp(means[int(0.025 * draws)]), 4), round(math.exp(means[int(0.975 * draws)]), 4)],
            "n": len(ratios)}


def fmt_ratio(x: dict[str, Any]) -> str:
    return f"{x['ratio']:.3f}x [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"
