"""Helpers for e2e tests: build the tiny model once, run the driver in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DRIVER = Path(__file__).with_name("driver.py")


def driver_env(spec: dict, hash_seed: str = "0") -> dict[str, str]:
    tests = str(Path(__file__).resolve().parent.parent)  # plug-in tiers for tests live there (plugin_kinds.py)
    # Tensor parallel ranks get one core each ('|' separates the ranks' cores).
    ranks = spec.get("tensor_parallel_size", 1)
    binding = "|".join(str(r % 2) for r in range(ranks)) if ranks > 1 else "0-1"
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, VLLM_CPU_OMP_THREADS_BIND=binding, VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    if spec.get("in_process"):  # engine core in the driver's process: the driver can look at vLLM's scheduler
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def run_driver(spec: dict, hash_seed: str = "0", timeout: int = 900, driver: Path = DRIVER) -> dict:
    proc = subprocess.run([sys.executable, str(driver), json.dumps(spec)], env=driver_env(spec, hash_seed),
                          capture_output=True, text=True, timeout=timeout)
    return parse_result(proc.returncode, proc.stdout, proc.stderr)


def start_driver(spec: dict, workdir: Path, hash_seed: str = "0") -> subprocess.Popen[bytes]:
    """A driver running in the background, its output in ``workdir`` (with ``gates`` it waits for the test
    between turns: ``gate_dir`` is ``workdir``)."""
    with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
        return subprocess.Popen([sys.executable, str(DRIVER), json.dumps({**spec, "gate_dir": str(workdir)})],
                                env=driver_env(spec, hash_seed), stdout=out, stderr=err)


def finish_driver(proc: subprocess.Popen[bytes], workdir: Path, timeout: int = 900) -> dict:
    proc.wait(timeout=timeout)
    return parse_result(proc.returncode, (workdir / "stdout").read_text(errors="replace"),
                        (workdir / "stderr").read_text(errors="replace"))


def wait_for(path: Path, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            log = path.parent / "stderr"
            raise AssertionError(f"driver exited early:\n{log.read_text(errors='replace')[-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout_s} s")
        time.sleep(0.1)


def parse_result(returncode: int, stdout: str, stderr: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("E2E-RESULT "):
            result = json.loads(line[len("E2E-RESULT "):])
            result["log"] = stderr[-20000:]
            return result
    raise AssertionError(f"driver failed (rc={returncode}):\n{stdout[-3000:]}\n{stderr[-8000:]}")


def full_blocks(prompt_len: int, block_size: int = 128) -> int:
    """Tokens kvtier can serve for a prompt: whole blocks, leaving the last token to compute."""
    return (prompt_len - 1) // block_size * block_size
