"""The GPU check's promise: the worker side, the copies and the tiers need no vLLM (the GPU machine has none).
Each test runs a subprocess in which ``import vllm`` fails (scripts/novllm/sitecustomize.py), here where vLLM
is installed, and finally the whole scripts/gpu-check.sh as a small dry run on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = {**os.environ, "PYTHONPATH": f"{ROOT / 'scripts' / 'novllm'}:{ROOT}"}


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=BLOCKED, cwd=ROOT,
                          timeout=300)


def test_vllm_is_really_blocked_and_the_connector_itself_needs_it() -> None:
    out = run_blocked("import kvtier.connector as c\n"
                      "try:\n    c.KVTierConnector\nexcept ImportError as e:\n    print('needs', e.name)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["needs", "vllm"]


def test_worker_side_modules_import_and_run_without_vllm() -> None:
    code = """
import importlib, sys, torch
for name in ["kvtier.connector.worker", "kvtier.connector.saving", "kvtier.connector.loading",
             "kvtier.connector.scheduler", "kvtier.transfer", "kvtier.tiers.stack", "kvtier.tiers.dram",
             "kvtier.tiers.disk", "kvtier.tiers.s3", "kvtier.tiers.redis", "kvtier.codecs"]:
    importlib.import_module(name)
from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierMetadata, LoadSpec
from kvtier.connector.worker import WorkerSide
side = WorkerSide(KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "4MiB"}],
                                          "connector": {"staging_bytes": "4MiB"}}, env={}), 8)
kv = {"l0": torch.randn(2, 8, 16, 2, 32).to(torch.bfloat16)}
side.register_kv_caches(kv)
side.wait_for_save(KVTierMetadata(saves=[(b"k" * 16, 3)], save_reqs=["a"]))
assert side.get_finished({"a"}, KVTierMetadata(release_after_saves=["a"]))[0] == {"a"}
side.drain()
side.start_load_kv(KVTierMetadata(loads=[LoadSpec("b", [b"k" * 16], [5])]))
assert torch.equal(kv["l0"][:, 5], kv["l0"][:, 3]) and side.take_load_errors() == set()
side.shutdown()
print(sorted(m for m in sys.modules if m.split(".")[0] == "vllm"))
"""
    out = run_blocked(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_gpu_check_script_runs_end_to_end_as_a_cpu_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "KVTIER_GPU_CHECK_ON_CPU": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(tmp_path)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "vLLM is not importable here and was not needed" in out.stdout
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert check["passed"] and len(check["checks"]) == 6
    bench = json.loads((tmp_path / "transfer_cpu.json").read_text())
    assert {row["case"] for row in bench["rows"]} >= {"save (device->staging)", "load (staging->device)",
                                                      "copy d2h", "copy h2d"}
    assert bench["step"]["step_ms"] > 0 and (tmp_path / "transfer_cpu.md").exists()
