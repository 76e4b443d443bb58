"""Helpers for e2e tests: build the tiny model once, run the driver in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).with_name("driver.py")


def run_driver(spec: dict, hash_seed: str = "0", timeout: int = 900, driver: Path = DRIVER) -> dict:
    tests = str(Path(__file__).resolve().parent.parent)  # plug-in tiers for tests live there (plugin_kinds.py)
    # Tensor parallel ranks get one core each ('|' separates the ranks' cores).
    ranks = spec.get("tensor_parallel_size", 1)
    binding = "|".join(str(r % 2) for r in range(ranks)) if ranks > 1 else "0-1"
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, VLLM_CPU_OMP_THREADS_BIND=binding, VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(driver), json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E-RESULT "):
            result = json.loads(line[len("E2E-RESULT "):])
            result["log"] = proc.stderr[-20000:]
            return result
    raise AssertionError(f"driver failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")


def full_blocks(prompt_len: int, block_size: int = 128) -> int:
    """Tokens kvtier can serve for a prompt: whole blocks, leaving the last token to compute."""
    return (prompt_len - 1) // block_size * block_size
