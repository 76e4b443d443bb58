"""Faulty servers and hostile settings: bounded stalls, bounded memory, prompt shutdown and reset, failed
loads always reported, no secret in any output, bad settings named at validate time.

Servers are real (redis-server, SeaweedFS), frozen with SIGSTOP and thawed with SIGCONT; the worker side is
kvtier's own WorkerSide over vLLM-shaped KV tensors on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from servers import S3_BUCKET, RedisServer

from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierMetadata, LoadSpec
from kvtier.connector.worker import WorkerSide
from kvtier.errors import ConfigError, TierError
from kvtier.redact import redact_url
from kvtier.tiers.stack import TierStack

pytestmark = pytest.mark.server
NUM_BLOCKS, HEADS, TOKENS, HEAD = 64, 2, 16, 32
BLOCK_BYTES = 2 * HEADS * TOKENS * 2 * HEAD * 2  # 2 layers of bf16 [heads, tokens, 2*head]


@contextmanager
def frozen(server: Any) -> Iterator[None]:
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


def caches() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {f"l{i}": torch.randn(NUM_BLOCKS, HEADS, TOKENS, 2 * HEAD, generator=gen).to(torch.bfloat16)
            for i in range(2)}


def worker_over(tiers: list[dict[str, Any]], **connector: Any) -> WorkerSide:
    cfg = KVTierConfig.from_dict({"tiers": tiers, "connector": connector}, env={})
    side = WorkerSide(cfg, NUM_BLOCKS)
    side.register_kv_caches(caches())
    return side


def s3_tier(server: Any, **extra: Any) -> dict[str, Any]:
    return {"kind": "s3", "capacity": 0, "bucket": S3_BUCKET, "prefix": f"fault-{uuid.uuid4().hex[:8]}",
            "endpoint_url": server.endpoint_url, "addressing_style": "path", "region": "us-east-1",
            "access_key_id": server.access_key, "secret_access_key": server.secret_key, **extra}


def redis_tier(server: Any, **extra: Any) -> dict[str, Any]:
    return {"kind": "redis", "capacity": 0, "url": server.url, "key_prefix": f"fault-{uuid.uuid4().hex[:8]}", **extra}


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


# ---- 6. a hung server --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["s3", "redis"])
def test_a_hung_server_stalls_a_load_about_one_second_then_loads_fail_fast(kind: str,
                                                                          request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("seaweed_server" if kind == "s3" else "redis_server")
    side = worker_over([s3_tier(server) if kind == "s3" else redis_tier(server)])
    keys = [key(i) for i in range(4)]
    side.wait_for_save(KVTierMetadata(saves=[(k, i + 1) for i, k in enumerate(keys)]))
    assert side.drain(30)
    tier: Any = side.stack.tiers[0]
    tier.breaker.initial_s = 0.5  # shorter windows keep the test short; the logic is the same
    with frozen(server):
        stalls = []
        for step in range(6):
            start = time.perf_counter()
            side.start_load_kv(KVTierMetadata(loads=[LoadSpec(f"r{step}", keys, [10, 11, 12, 13])]))
            stalls.append(time.perf_counter() - start)
            assert side.take_load_errors() == {10, 11, 12, 13}
            time.sleep(0.3)  # windows end meanwhile: a load still never becomes the probe
        assert stalls[0] < 1.6, f"first load waited {stalls[0]:.2f} s"
        assert max(stalls[1:]) < 0.1, f"later loads waited {max(stalls[1:]):.2f} s: the breaker sat on them"
    deadline = time.monotonic() + 20  # thawed: the background probe closes the breaker, loads hit again
    while tier.breaker.is_open and time.monotonic() < deadline:
        side.start_load_kv(KVTierMetadata(loads=[LoadSpec("again", keys[:1], [20])]))
        side.take_load_errors()
        time.sleep(0.2)
    side.start_load_kv(KVTierMetadata(loads=[LoadSpec("healed", keys, [30, 31, 32, 33])]))
    assert side.take_load_errors() == set()
    side.shutdown()


# ---- 7. the save queue, shutdown -----------------------------------------------------------------------------

def test_saves_to_a_stalled_store_are_bounded_dropped_and_counted_and_shutdown_is_prompt(
        seaweed_server: Any, tmp_path: Path) -> None:
    bound = 8 * BLOCK_BYTES
    s3 = s3_tier(seaweed_server, save_timeout_s=20.0, retries=0)
    side = worker_over([s3], max_pending_save_bytes=bound, save_timeout_s=2.0, transfer_threads=1)
    with frozen(seaweed_server):
        start = time.perf_counter()
        for step in range(40):  # 40 steps of 2 blocks at a frozen S3: at most 8 blocks may wait
            side.wait_for_save(KVTierMetadata(saves=[(key(2 * step), 1), (key(2 * step + 1), 2)]))
            assert side.saves.held_bytes <= bound
        assert time.perf_counter() - start < 2.0  # an engine step never waits on the store
        # Copies in flight are bounded by the staging pool; once they are done they find the queue full too.
        assert side.saver is not None and side.saver.flush(1.0)
        assert side.saves.held_bytes <= bound
        assert side.counters.values().get("save_dropped_blocks", 0) >= 80 - 8
        start = time.perf_counter()
        side.shutdown()
        assert time.perf_counter() - start < 2.0 + 1.0, "shutdown waited past connector.save_timeout_s"
    assert side.counters.values().get("save_dropped_blocks", 0) + 8 >= 80


# ---- 2. failed loads are reported, sync and async -----------------------------------------------------------

@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_load_that_fails_in_any_way_reports_every_block(tmp_path: Path, is_async: bool) -> None:
    side = worker_over([{"kind": "dram", "capacity": "4MiB"}])
    keys = [key(i) for i in range(3)]
    side.wait_for_save(KVTierMetadata(saves=[(k, i + 1) for i, k in enumerate(keys)]))
    side.drain()
    assert side.loader is not None

    def broken_copy(*args: Any) -> None:
        raise RuntimeError("device copy failed")

    # whichever path writes the blocks (staged copies; the placer for host KV caches) fails
    side.loader.copy = broken_copy  # type: ignore[method-assign]
    side.loader.placer = lambda block_ids: broken_copy  # type: ignore[method-assign]
    side.start_load_kv(KVTierMetadata(loads=[LoadSpec("r", keys, [20, 21, 22], is_async=is_async)]))
    if is_async:
        deadline = time.monotonic() + 10
        done: set[str] = set()
        while not done and time.monotonic() < deadline:
            done = side.get_finished(set())[1] or set()
        assert done == {"r"}
    assert side.take_load_errors() == {20, 21, 22}
    side.shutdown()


def test_save_nice_lowers_only_the_save_threads_priority(tmp_path: Path) -> None:
    """connector.save_nice: the stores give way to the engine's threads; the engine thread keeps its priority."""
    import threading

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = own_nice()
    side = worker_over([{"kind": "dram", "capacity": "4MiB"}], save_nice=7)
    future = side.saves.submit(own_nice)
    assert future is not None and future.result(timeout=10) == min(19, before + 7)
    assert own_nice() == before
    side.shutdown()


def test_save_idle_puts_only_the_save_threads_under_sched_idle(tmp_path: Path) -> None:
    """connector.save_idle: the stores run on idle CPU time only; the engine thread keeps its policy."""
    import threading

    def own_policy() -> int:
        return os.sched_getscheduler(threading.get_native_id())

    before = own_policy()
    side = worker_over([{"kind": "dram", "capacity": "4MiB"}], save_idle=True)
    future = side.saves.submit(own_policy)
    assert future is not None and future.result(timeout=10) == os.SCHED_IDLE != before
    assert own_policy() == before
    side.shutdown()


# ---- 12. reset ---------------------------------------------------------------------------------------------

def test_reset_is_prompt_forgets_local_blocks_and_never_deletes_shared_ones(tmp_path: Path,
                                                                           seaweed_server: Any) -> None:
    s3 = s3_tier(seaweed_server, write_through=True)
    side = worker_over([{"kind": "dram", "capacity": "1MiB"}, {"kind": "disk", "capacity": "64MiB",
                        "path": str(tmp_path / "disk")}, s3])
    for step in range(30):
        side.wait_for_save(KVTierMetadata(saves=[(key(10 * step + j), j + 1) for j in range(10)]))
    assert side.drain(60)
    disk: Any = side.stack.tiers[1]
    assert len(disk) > 100 and len(list(side.stack.tiers[2].entries())) == 300
    start = time.perf_counter()
    side.start_load_kv(KVTierMetadata(clear_store=True))
    assert time.perf_counter() - start < 0.1
    assert all(len(t) == 0 for t in side.stack.tiers)
    assert side.drain(30)  # local files are removed in the background ...
    assert not list((tmp_path / "disk").rglob("*.kvb"))
    assert len(list(side.stack.tiers[2].entries())) == 300  # ... shared objects stay for other instances
    side.shutdown()


# ---- 13. secrets -------------------------------------------------------------------------------------------

PASSWORDS = ["pa/ss#w?rd@x", "a#b", "q?uery=1", "sl/ash", "p@ss:word"]


@pytest.mark.parametrize("password", PASSWORDS)
def test_no_password_reaches_any_output(password: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier import cli

    url = f"redis://:{password}@127.0.0.1:1/0"
    spec = {"tiers": [{"kind": "redis", "capacity": 0, "url": url, "password": password},
                      {"kind": "s3", "capacity": 0, "bucket": "kv-b", "secret_access_key": password,
                       "endpoint_url": f"http://user:{password}@127.0.0.1:1"}]}
    cfg = KVTierConfig.from_dict(spec, env={})
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(spec))
    outputs = [json.dumps(cfg.to_dict()), repr(cfg), str(cfg.tiers[0]), repr(cfg.tiers[0].options), redact_url(url)]
    assert cli.main(["validate", str(path), "--json"]) == 0
    outputs.append(capsys.readouterr().out)
    with caplog.at_level(logging.DEBUG, logger="kvtier"), pytest.raises(TierError) as err:
        TierStack.from_config(cfg)  # nothing listens on port 1: the start-up error names the server
    outputs += [str(err.value), caplog.text]
    for text in outputs:
        assert password not in text
        assert password.split("@")[0] not in text or len(password.split("@")[0]) < 3


# ---- 14. validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("tier", "message"), [
    ({"kind": "disk", "capacity": "1GiB", "codec": {"name": "zstd", "level": 0}}, r"tiers\[0\]\.codec\.level: zstd"),
    ({"kind": "disk", "capacity": "1GiB", "codec": {"name": "zstd", "level": 99}}, r"tiers\[0\]\.codec\.level"),
    ({"kind": "redis", "capacity": 0, "load_timeout_s": -1}, r"tiers\[0\]\.load_timeout_s: must be at least"),
    ({"kind": "s3", "capacity": 0, "bucket": "kv-b", "connect_timeout_s": 0}, r"tiers\[0\]\.connect_timeout_s"),
    ({"kind": "dram", "capacity": 10**30}, r"tiers\[0\]\.capacity: .* larger than 1 EiB"),
    ({"kind": "dram", "capacity": "1GiB", "page_size": 1}, r"tiers\[0\]\.page_size: at least 512"),
    ({"kind": "dram", "capacity": "1TiB", "page_size": 512}, r"tiers\[0\]\.capacity: .*pages"),
])
def test_bad_settings_fail_validation_naming_the_key(tier: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        KVTierConfig.from_dict({"tiers": [tier]}, env={})
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"tiers": [tier]}))
    out = subprocess.run([sys.executable, "-m", "kvtier", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "tiers[0]" in out.stderr


# ---- 16. environment variables -----------------------------------------------------------------------------

def test_unrelated_kvtier_variables_are_ignored_and_misspelt_keys_fail(caplog: pytest.LogCaptureFixture) -> None:
    base = {"tiers": [{"kind": "dram", "capacity": "1MiB"}]}
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        cfg = KVTierConfig.from_dict(base, env={"KVTIER_EVAL_TP": "2", "KVTIER_DRAM": "16MiB",
                                                "KVTIER_CONNECTOR__ASYNC_LOAD": "true", "KVTIER_CHECKSUM": "crc32"})
    assert cfg.connector.async_load and cfg.checksum == "crc32"
    assert "KVTIER_EVAL_TP" in caplog.text and "KVTIER_DRAM" in caplog.text
    with pytest.raises(ConfigError, match="KVTIER_CHEKSUM: 'cheksum' is not a config key.*'checksum'"):
        KVTierConfig.from_dict(base, env={"KVTIER_CHEKSUM": "crc32"})
    with pytest.raises(ConfigError, match=r"connector\.async_laod: unknown key \(did you mean 'async_load'"):
        KVTierConfig.from_dict(base, env={"KVTIER_CONNECTOR__ASYNC_LAOD": "true"})
    with pytest.raises(ConfigError, match="KVTIER_CONECTOR__ASYNC_LOAD: 'conector' is not a top-level.*'connector'"):
        KVTierConfig.from_dict(base, env={"KVTIER_CONECTOR__ASYNC_LOAD": "true"})


def test_redis_server_fixture_password_is_not_in_errors(tmp_path: Path) -> None:
    secret = "s3cr/t#pw"
    server = RedisServer(tmp_path, password=secret)
    server.start()
    try:
        cfg = KVTierConfig.from_dict({"tiers": [{"kind": "redis", "capacity": 0, "url": server.url,
                                                 "password": "wrong/pass#word"}]}, env={})
        with pytest.raises(TierError) as err:
            TierStack.from_config(cfg)
        assert "authentication" in str(err.value) and "wrong/pass" not in str(err.value)
    finally:
        server.stop()
    os.environ.pop("KVTIER_AUTH_KEY", None)


def test_a_load_waits_for_the_save_of_the_same_blocks_still_in_flight(tmp_path: Path) -> None:
    side = worker_over([{"kind": "dram", "capacity": "4MiB"}])
    release = __import__("threading").Event()
    real_put_many = side.stack.put_many
    side.stack.put_many = lambda items: (release.wait(5), real_put_many(items))[1]  # type: ignore[method-assign]
    keys = [key(i) for i in range(3)]
    side.wait_for_save(KVTierMetadata(saves=[(k, i + 1) for i, k in enumerate(keys)]))
    __import__("threading").Timer(0.3, release.set).start()
    start = time.perf_counter()
    side.start_load_kv(KVTierMetadata(loads=[LoadSpec("r", keys, [20, 21, 22])]))
    assert side.take_load_errors() == set() and time.perf_counter() - start >= 0.25
    assert side.layout is not None
    for i in range(3):
        assert torch.equal(side.layout.tensors["l0"][20 + i], side.layout.tensors["l0"][1 + i])
    side.shutdown()
