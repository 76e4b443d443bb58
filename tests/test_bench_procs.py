"""kvtier_bench.procs: the engine-process protocol of the micro-benchmarks and their paired-ratio statistics."""

from __future__ import annotations

import math
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kvtier_bench.procs import EngineProcess, geo_interval, run_interleaved, wait_for_startup_work


def test_geo_interval_of_equal_ratios_is_that_ratio_with_no_spread() -> None:
    out = geo_interval([2.0] * 6)
    assert out == {"ratio": 2.0, "ci95": [2.0, 2.0], "n": 6}


def test_geo_interval_is_the_geometric_mean_and_brackets_it() -> None:
    ratios = [0.5, 2.0, 1.0, 4.0, 0.25, 1.0]
    out = geo_interval(ratios)
    assert out["ratio"] == pytest.approx(math.prod(ratios) ** (1 / len(ratios)), abs=1e-4)
    low, high = out["ci95"]
    assert low < out["ratio"] < high
    assert geo_interval(ratios) == out  # seeded: the same interval every time


def test_engine_process_runs_commands_between_pauses(tmp_path: Path) -> None:
    script = tmp_path / "echo_worker.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        spec = json.loads(sys.argv[2])
        print("noise before ready", flush=True)
        print("READY", flush=True)
        for line in sys.stdin:
            print("RESULT " + json.dumps({"n": int(line) * spec["scale"], "pid": os.getpid()}), flush=True)
    """))
    engine = EngineProcess("echo", str(script), {"scale": 3})
    try:
        engine.ready()
        state = Path(f"/proc/{engine.proc.pid}/stat").read_text().split()[2]
        assert state == "T"  # stopped while idle: it takes no CPU from the engine being measured
        assert engine.run("4") == {"n": 12, "pid": engine.proc.pid}
        assert engine.run("5")["n"] == 15
    finally:
        engine.close()
    assert engine.proc.returncode == 0
    assert not Path(engine.log.name).exists()  # a clean run leaves no log behind


def test_run_interleaved_gives_each_engine_its_reps_in_order_and_closes_them(tmp_path: Path, capsys) -> None:
    script = tmp_path / "clock_worker.py"
    script.write_text(textwrap.dedent("""
        import json, sys, time
        print("READY", flush=True)
        for line in sys.stdin:
            print("RESULT " + json.dumps({"rep": int(line), "at": time.monotonic()}), flush=True)
    """))
    engines = [EngineProcess(name, str(script), {}) for name in ("a", "b", "c")]
    raw = run_interleaved(engines, 3, "rep", lambda r: f"got {r['rep']}")
    assert [[r["rep"] for r in raw[n]] for n in "abc"] == [[0, 1, 2]] * 3
    firsts = [min("abc", key=lambda n, rep=rep: raw[n][rep]["at"]) for rep in range(3)]
    assert firsts == ["a", "b", "c"]  # the order rotates by one engine each rep
    assert all(engine.proc.returncode == 0 for engine in engines)
    assert "rep 3/3: a got 2, b got 2, c got 2" in capsys.readouterr().out


def test_engine_process_that_dies_names_its_log(tmp_path: Path) -> None:
    script = tmp_path / "dies.py"
    script.write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(1)\n")
    engine = EngineProcess("dies", str(script), {})
    try:
        with pytest.raises(RuntimeError, match="dies exited; its log: "):
            engine.ready()
        assert "boom" in Path(engine.log.name).read_text()
    finally:
        engine.close()
    assert "boom" in Path(engine.log.name).read_text()  # kept for whoever reads the error
    Path(engine.log.name).unlink()


def test_wait_for_startup_work_waits_for_kvtiers_prefault_threads_only() -> None:
    done = threading.Event()
    other = threading.Thread(target=done.wait, name="kvtier-save-0", daemon=True)  # never ends by itself
    prefault = threading.Thread(target=time.sleep, args=(0.2,), name="kvtier-prefault-dram")
    other.start()
    prefault.start()
    wait_for_startup_work()
    assert not prefault.is_alive() and other.is_alive()
    done.set()


def test_compute_dtype_is_bf16_only_where_the_machine_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kvtier_bench.procs import compute_dtype, kv_scale

    monkeypatch.delenv("KVTIER_BENCH_DTYPE", raising=False)
    caps = torch.cpu.get_capabilities()
    native = torch.cuda.is_available() or any(caps.get(f, False) for f in ("avx512_bf16", "amx_bf16", "bf16"))
    assert compute_dtype() == ("bfloat16" if native else "float32")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**caps, "avx512_bf16": False, "amx_bf16": False,
                                                                "bf16": False})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (compute_dtype(), kv_scale()) == ("float32", 2)  # e.g. an AVX2-only CPU: bf16 would be emulated
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**caps, "avx512_bf16": True})
    assert (compute_dtype(), kv_scale()) == ("bfloat16", 1)
    monkeypatch.setenv("KVTIER_BENCH_DTYPE", "float32")  # the override wins
    assert (compute_dtype(), kv_scale()) == ("float32", 2)


def _sizes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dtype: str,
           overrides: dict[str, object] | None = None) -> tuple[str, list[int]]:
    """The model the engines would run and every KV size (vLLM's KV spaces, tier capacities) of the configs."""
    from kvtier_bench.configs import build_configs, engine_model
    from kvtier_bench.settings import load_settings

    monkeypatch.setenv("KVTIER_BENCH_DTYPE", dtype)
    settings = load_settings(overrides=overrides)
    out = []
    for cfg in build_configs(settings, tmp_path, None):
        out.append(cfg.kv_cache_bytes)
        tiers = (cfg.kv_transfer or {}).get("kv_connector_extra_config", {}).get("tiers", [])
        out += [tier["capacity"] for tier in tiers]
    return engine_model(settings), out


def test_configs_double_every_kv_size_for_float32_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    own = {"model": "small"}  # a model named by the user runs everywhere: no stand-in
    (model_half, half), (model_full, full) = (_sizes(monkeypatch, tmp_path, d, own) for d in ("bfloat16", "float32"))
    assert model_half == model_full == "small"
    assert len(half) > 3 and full == [2 * x for x in half]


def test_default_preset_runs_its_float32_stand_in_with_the_same_tokens(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    from kvtier_bench.models import SIZES, kv_bytes_per_token_of

    model_bf16, bf16 = _sizes(monkeypatch, tmp_path, "bfloat16")
    model_fp32, fp32 = _sizes(monkeypatch, tmp_path, "float32")
    assert (model_bf16, model_fp32) == ("small", "tiny")
    small, tiny = SIZES["small"], SIZES["tiny"]
    assert tiny.num_hidden_layers * tiny.hidden_size ** 2 < small.num_hidden_layers * small.hidden_size ** 2 / 4
    # Every size holds as many tokens of tiny in float32 as it held of small in bf16.
    per_token_bf16, per_token_fp32 = kv_bytes_per_token_of("small", 2), kv_bytes_per_token_of("tiny", 4)
    assert per_token_fp32 < per_token_bf16
    assert [x // per_token_fp32 for x in fp32] == [x // per_token_bf16 for x in bf16]
    # A settings layer that names a model without a stand-in runs that model, in float32 too.
    assert _sizes(monkeypatch, tmp_path, "float32", {"model": "tiny"})[0] == "tiny"
    assert _sizes(monkeypatch, tmp_path, "float32", {"float32_model": None})[0] == "small"
    assert _sizes(monkeypatch, tmp_path, "float32", {"model": "small", "float32_model": "base"})[0] == "base"


def test_float32_model_must_be_a_name_or_null() -> None:
    from kvtier.errors import ConfigError
    from kvtier_bench.settings import load_settings

    with pytest.raises(ConfigError, match="float32_model"):
        load_settings(overrides={"float32_model": 3})
