"""The worker's asynchronous copies on the CPU build, with copies held in flight (tests/copy_helpers.py):
delayed block release reported through finished_sending, copies completing out of order, preemption fences,
loads waiting on the device, a bounded staging pool (saves dropped and counted, loads back-pressured or
failed), shutdown with copies still in flight."""

from __future__ import annotations

import threading
import time

import torch
from copy_helpers import held_worker, key

from kvtier.connector.metadata import KVTierMetadata, LoadSpec
from kvtier.connector.worker import IDLE_WAIT_S


def saves(first: int, count: int, block: int = 0) -> list[tuple[bytes, int]]:
    return [(key(first + i), block + i) for i in range(count)]


def test_a_finished_request_is_released_only_once_its_copies_are_done() -> None:
    worker, fences, _ = held_worker()
    # Step 1: request "a" saves 3 blocks; the copy is issued and wait_for_save returns at once.
    start = time.perf_counter()
    worker.wait_for_save(KVTierMetadata(saves=saves(0, 3), save_reqs=["a"]))
    assert time.perf_counter() - start < 0.5 and len(fences.made) == 1
    # Step 2: "a" finished (request_finished said True); "b" finished too but had no copies.
    assert worker.get_finished({"a", "b"}, KVTierMetadata(release_after_saves=["a", "b"])) == ({"b"}, None)
    # Steps 3-4: while the copy is in flight "a" is not reported; nothing is stored yet either.
    for _ in range(2):
        assert worker.get_finished(set(), KVTierMetadata()) == (None, None)
    assert worker.stack.where(key(0)) is None
    # The copy completes: "a" is reported exactly once, and its blocks reach the store.
    fences.made[0].release()
    assert worker.get_finished(set(), KVTierMetadata()) == ({"a"}, None)
    assert worker.get_finished(set(), KVTierMetadata()) == (None, None)
    assert worker.drain(5)
    assert [worker.stack.where(key(i)) for i in range(3)] == ["dram"] * 3
    worker.shutdown()


def test_copies_completing_out_of_order_release_and_store_what_is_done() -> None:
    worker, fences, caches = held_worker()
    worker.wait_for_save(KVTierMetadata(saves=saves(0, 2, block=0), save_reqs=["a", "b"]))  # copy 1: a, b
    worker.wait_for_save(KVTierMetadata(saves=saves(10, 2, block=2), save_reqs=["b", "c"]))  # copy 2: b, c
    announce = KVTierMetadata(release_after_saves=["a", "b", "c"])
    assert worker.get_finished({"a", "b", "c"}, announce) == (None, None)
    fences.made[1].release()  # the later copy completes first
    assert worker.get_finished(set(), KVTierMetadata()) == ({"c"}, None)  # b still has copy 1 in flight
    deadline = time.monotonic() + 5
    while worker.stack.where(key(10)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.stack.where(key(10)) == "dram" and worker.stack.where(key(0)) is None  # not held up by copy 1
    fences.made[0].release()
    assert worker.get_finished(set(), KVTierMetadata()) == ({"a", "b"}, None)
    assert worker.drain(5)
    got = worker.stack.get(key(11))
    assert got is not None and bytes(got[0]) == b"".join(t[3].contiguous().view(torch.uint8).numpy().tobytes()
                                                         for t in caches.values())
    worker.shutdown()


def test_preemption_fences_the_copies_out_of_the_freed_blocks_before_the_forward() -> None:
    worker, fences, _ = held_worker()
    worker.wait_for_save(KVTierMetadata(saves=saves(0, 2), save_reqs=["a"]))
    worker.wait_for_save(KVTierMetadata(saves=saves(10, 2, block=4), save_reqs=["b"]))
    worker.wait_for_save(KVTierMetadata(saves=saves(20, 2, block=8), save_reqs=["c"]))
    fences.made[2].release()  # c's copy is already done: nothing to wait for
    worker.handle_preemptions(KVTierMetadata(preempted=["a", "c"]))
    # The compute stream and later loads wait for a's copy; b's and c's are left alone.
    assert [f.guards for f in fences.made] == [2, 0, 0]
    worker.handle_preemptions(KVTierMetadata())
    assert [f.guards for f in fences.made] == [2, 0, 0]
    fences.release_all()
    worker.shutdown()


def test_attention_that_frees_running_blocks_fences_every_copy_every_step() -> None:
    worker, fences, _ = held_worker(fence_every_step=True)
    worker.wait_for_save(KVTierMetadata(saves=saves(0, 2), save_reqs=["a"]))
    worker.wait_for_save(KVTierMetadata(saves=saves(10, 2, block=4), save_reqs=["b"]))
    worker.handle_preemptions(KVTierMetadata())
    assert [f.guards for f in fences.made] == [2, 2]
    worker.wait_for_save(KVTierMetadata(saves=saves(20, 2, block=8), save_reqs=["c"]))
    worker.handle_preemptions(KVTierMetadata())  # each copy is fenced once: later work is ordered after it
    assert [f.guards for f in fences.made] == [2, 2, 2]
    fences.release_all()
    worker.shutdown()


def stored_blocks(worker, fences, count: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    keys = [key(100 + i) for i in range(count)]
    for start in range(0, count, 8):  # saves may hold half the staging pool: 8 blocks here
        worker.wait_for_save(KVTierMetadata(saves=[(k, start + i) for i, k in enumerate(keys[start:start + 8])]))
        fences.release_all()
        assert worker.drain(5)
    assert all(worker.stack.where(k) == "dram" for k in keys)
    return keys


def test_a_sync_load_makes_the_forward_wait_on_the_device_not_the_host() -> None:
    worker, fences, caches = held_worker()
    keys = stored_blocks(worker, fences, 3)
    start = time.perf_counter()
    worker.start_load_kv(KVTierMetadata(loads=[LoadSpec("r", keys, [30, 31, 32])]))
    assert time.perf_counter() - start < 0.5  # the host did not wait for the copy
    load = fences.made[-1]
    assert not load.done() and load.guards == 1  # the compute stream waits for it before the forward
    for name in caches:  # (on CPU the bytes are already there)
        assert torch.equal(caches[name][30:33], caches[name][0:3])
    load.release()
    worker.shutdown()


def test_layerwise_loading_waits_per_layer_in_the_attention_layers() -> None:
    worker, fences, caches = held_worker(layerwise_load=True)
    keys = stored_blocks(worker, fences, 2)
    worker.start_load_kv(KVTierMetadata(loads=[LoadSpec("r", keys, [40, 41])]))
    load = fences.made[-1]
    assert load.guards == 0  # nothing waits before the forward
    for name in caches:
        worker.wait_for_layer_load(name)
    assert load.guards == len(caches)
    worker.wait_for_save(KVTierMetadata())  # end of step: this step's load fences are forgotten
    worker.wait_for_layer_load(next(iter(caches)))
    assert load.guards == len(caches)
    load.release()
    worker.shutdown()


def held_async_load(worker, fences) -> float:  # type: ignore[no-untyped-def]
    """Start an async load of 2 stored blocks (request "r") and return once its copy is issued (held in flight);
    returns the deadline the test waits until."""
    keys = stored_blocks(worker, fences, 2)
    made = len(fences.made)
    worker.start_load_kv(KVTierMetadata(loads=[LoadSpec("r", keys, [50, 51], is_async=True)]))
    deadline = time.monotonic() + 5
    while len(fences.made) == made and time.monotonic() < deadline:
        time.sleep(0.01)
    return deadline


def test_an_async_load_is_reported_only_once_its_copies_are_done() -> None:
    worker, fences, _ = held_worker()
    deadline = held_async_load(worker, fences)
    time.sleep(0.1)
    assert worker.get_finished(set(), KVTierMetadata()) == (None, None)
    fences.made[-1].release()
    done = None
    while not done and time.monotonic() < deadline:
        done = worker.get_finished(set(), KVTierMetadata())[1]
    assert done == {"r"} and worker.take_load_errors() == set()
    worker.shutdown()


def test_an_idle_step_blocks_briefly_on_async_loads_instead_of_letting_the_engine_spin() -> None:
    """With every request waiting for its load, vLLM steps again at once: a busy loop holding the GIL that the
    load threads need. An idle step's get_finished waits (at most IDLE_WAIT_S) for the first load instead."""
    worker, fences, _ = held_worker()
    deadline = held_async_load(worker, fences)
    start = time.perf_counter()
    assert worker.get_finished(set(), KVTierMetadata()) == (None, None)  # a step with work: no wait
    busy = time.perf_counter() - start
    start = time.perf_counter()
    assert worker.get_finished(set(), KVTierMetadata(idle=True)) == (None, None)
    assert busy < IDLE_WAIT_S <= time.perf_counter() - start + 0.001 < 1.0
    threading.Timer(0.2, fences.made[-1].release).start()
    calls, done = 0, None
    while not done and time.monotonic() < deadline:
        done = worker.get_finished(set(), KVTierMetadata(idle=True))[1]
        calls += 1
    assert done == {"r"} and calls < 100  # ~40 waits of 5 ms, not a spin of thousands of calls
    worker.shutdown()


def test_saves_never_wait_for_staging_they_are_dropped_and_counted() -> None:
    worker, fences, _ = held_worker()  # 8 slots of 2 blocks; saves may hold 4 of them
    assert worker.build_worker_meta() is None
    start = time.perf_counter()
    worker.wait_for_save(KVTierMetadata(saves=saves(0, 11), save_reqs=["a"]))  # 8 fit, 3 dropped
    worker.wait_for_save(KVTierMetadata(saves=saves(20, 2), save_reqs=["b"]))  # the save share is used up
    assert time.perf_counter() - start < 0.5
    assert worker.pool is not None and worker.pool.in_use == 4
    counters = worker.counters.values()
    assert counters["staging_dropped_blocks"] == 3 + 2 and counters["save_dropped_blocks"] == 5
    dropped = worker.build_worker_meta()
    assert dropped is not None
    assert sorted(k for k, tier in dropped.events if tier is None) == sorted([key(i) for i in (8, 9, 10, 20, 21)])
    # "b" had no copy: released at once; "a" once its copy is done.
    assert worker.get_finished(set(), KVTierMetadata(release_after_saves=["a", "b"]))[0] == {"b"}
    fences.release_all()
    assert worker.drain(5) and worker.pool.in_use == 0
    worker.wait_for_save(KVTierMetadata(saves=saves(30, 2)))  # room again
    assert len(fences.made) == 2
    fences.release_all()
    worker.shutdown()


def test_loads_wait_for_staging_then_fail_and_are_reported_never_allocating_more() -> None:
    worker, fences, _ = held_worker()
    keys = stored_blocks(worker, fences, 16)
    # A load of 16 blocks takes all 8 slots; its copy stays in flight, so the slots stay taken.
    worker.start_load_kv(KVTierMetadata(loads=[LoadSpec("r1", keys, list(range(20, 36)))]))
    assert worker.pool is not None and worker.pool.in_use == worker.pool.count
    # The next load finds no slot: it waits (0.3 s here), then fails; every block is reported for recompute.
    worker.start_load_kv(KVTierMetadata(loads=[LoadSpec("r2", keys[:2], [40, 41])]))
    assert worker.take_load_errors() == {40, 41}
    assert worker.pool.timeouts == 1 and worker.pool.in_use == worker.pool.count
    # Back-pressure: a load that finds no slot gets one as soon as a copy completes.
    threading.Timer(0.1, fences.made[-1].release).start()
    worker.start_load_kv(KVTierMetadata(loads=[LoadSpec("r3", keys[:2], [42, 43])]))
    assert worker.take_load_errors() == set() and worker.pool.waits == 2
    fences.release_all()
    worker.shutdown()


def test_shutdown_with_copies_in_flight_returns_within_the_save_timeout() -> None:
    worker, fences, _ = held_worker(save_timeout_s=0.5)
    worker.wait_for_save(KVTierMetadata(saves=saves(0, 4), save_reqs=["a"]))
    worker.wait_for_save(KVTierMetadata(saves=saves(10, 2), save_reqs=["b"]))
    fences.made[1].release()
    start = time.perf_counter()
    worker.shutdown()  # copy 1 never completes
    assert time.perf_counter() - start < 0.5 + 0.5
    assert worker.watcher is not None and worker.watcher.pending() == 0
    assert worker.stack.where(key(10)) is None  # the store is closed too: nothing lands after shutdown
