"""The GPU check's scenario: kvtier's WorkerSide driven through scripted save and load steps on vLLM-shaped KV
tensors on the device (flash-attention layout ``[2, num_blocks, block_size, kv_heads, head_size]``, block size
16, 32 layers by default), with byte-exact checks against an independent host reference. Needs PyTorch, not
vLLM (scripts/gpu-check.sh runs it with vLLM blocked). ``--device cpu --quick`` runs the same script on CPU.

    python scripts/gpu_check.py [--device cuda] [--quick] [--out result.json]

Each check prints PASS or FAIL with what it measured; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.config import KVTierConfig  # noqa: E402
from kvtier.connector.metadata import KVTierMetadata, LoadSpec  # noqa: E402
from kvtier.connector.worker import WorkerSide  # noqa: E402


class Rig:
    """KV caches on the device, the blocks' expected bytes, and workers over them."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.device = torch.device(args.device)
        shape = (2, args.num_blocks, args.block_size, args.heads, args.head_size)
        self.caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
                       for i in range(args.layers)}
        self.expected: dict[int, np.ndarray] = {}  # block id -> what it holds (host reference)
        self.by_key: dict[bytes, np.ndarray] = {}  # saved key -> the bytes saved
        self.tmp = tmp
        self.gen = torch.Generator().manual_seed(0)

    def worker(self, **connector: Any) -> WorkerSide:
        cfg = KVTierConfig.from_dict({"tiers": [
            {"kind": "dram", "capacity": f"{self.args.dram_mib}MiB"},
            {"kind": "disk", "capacity": "4GiB", "path": str(self.tmp / f"disk{len(list(self.tmp.iterdir()))}"),
             "codec": {"name": "lz4"}}], "connector": {"save_timeout_s": 10.0, **connector}}, env={})
        side = WorkerSide(cfg, self.args.num_blocks)
        side.register_kv_caches(self.caches)
        return side

    def compute(self, block_ids: list[int]) -> None:
        """A forward that writes these blocks on the compute stream."""
        for b in block_ids:
            parts = [torch.randn(self.caches[n][:, b].shape, generator=self.gen).to(torch.bfloat16)
                     for n in self.caches]
            self.expected[b] = np.concatenate([p.view(torch.uint8).flatten().numpy() for p in parts])
            for name, part in zip(self.caches, parts):
                self.caches[name][:, b].copy_(part.to(self.device, non_blocking=False))

    def saves(self, tag: int, block_ids: list[int]) -> list[tuple[bytes, int]]:
        out = []
        for b in block_ids:
            key = (tag << 32 | b).to_bytes(16, "little")
            self.by_key[key] = self.expected[b].copy()
            out.append((key, b))
        return out

    def device_bytes(self, b: int) -> np.ndarray:
        return np.concatenate([kv[:, b].cpu().contiguous().view(torch.uint8).flatten().numpy()
                               for kv in self.caches.values()])


def slow_work(device: torch.device) -> None:
    """Tens of milliseconds of work queued on the compute stream: the rest of a forward still running."""
    size = 4096 if device.type == "cuda" else 128
    a = torch.randn(size, size, device=device)
    for _ in range(8 if device.type == "cuda" else 1):
        a = a @ a / size


def stored_exactly(side: WorkerSide, rig: Rig, keys: list[bytes]) -> bool:
    side.drain(60)
    for key in keys:
        got = side.stack.get(key)
        if got is None or not np.array_equal(np.frombuffer(got[0], dtype=np.uint8), rig.by_key[key]):
            return False
    return True


# ---- the steps ------------------------------------------------------------------------------------------------

def check_prefill_save_and_delayed_release(rig: Rig, side: WorkerSide) -> dict[str, Any]:
    n = rig.args.prefill_blocks
    rig.compute(list(range(n)))
    saves = rig.saves(1, list(range(n)))
    slow_work(rig.device)
    start = time.perf_counter()
    side.wait_for_save(KVTierMetadata(saves=saves, save_reqs=["A"]))
    issue_ms = (time.perf_counter() - start) * 1e3
    in_flight = side.saver.in_flight() if side.saver else 0
    steps, sending = 0, None
    announce = KVTierMetadata(release_after_saves=["A"])
    deadline = time.monotonic() + 60
    while not sending and time.monotonic() < deadline:  # later (empty) steps, about 1 ms apart
        sending = side.get_finished({"A"} if steps == 0 else set(), announce if steps == 0 else KVTierMetadata())[0]
        steps += 1
        if in_flight and steps == 1:
            assert not sending, "released while its copy was in flight"
        time.sleep(0.001)
    assert sending == {"A"}, f"finished_sending {sending}"
    assert side.saver is None or side.saver.in_flight() == 0
    assert side.get_finished(set(), KVTierMetadata())[0] is None, "reported twice"
    assert stored_exactly(side, rig, [k for k, _ in saves]), "stored bytes differ"
    return {"blocks": n, "wait_for_save_ms": round(issue_ms, 3), "copies_in_flight_after": in_flight,
            "steps_until_release": steps}


def check_decode_saves(rig: Rig, side: WorkerSide) -> dict[str, Any]:
    base, keys = rig.args.prefill_blocks, []
    for step in range(8):  # two requests complete one block each per step
        blocks = [base + 2 * step, base + 2 * step + 1]
        rig.compute(blocks)
        slow_work(rig.device)
        saves = rig.saves(2, blocks)
        keys += [k for k, _ in saves]
        side.wait_for_save(KVTierMetadata(saves=saves, save_reqs=["B", "C"]))
        side.get_finished(set(), KVTierMetadata())
    sending: set[str] = set()
    announce = KVTierMetadata(release_after_saves=["B", "C"])
    deadline = time.monotonic() + 60
    while sending != {"B", "C"} and time.monotonic() < deadline:
        sending |= side.get_finished(set(), announce)[0] or set()
        announce = KVTierMetadata()
        time.sleep(0.001)
    assert sending == {"B", "C"}, f"finished_sending {sending}"
    assert stored_exactly(side, rig, keys), "stored bytes differ"
    return {"steps": 8, "blocks": len(keys)}


def check_preemption_fence(rig: Rig, side: WorkerSide) -> dict[str, Any]:
    blocks = list(range(rig.args.prefill_blocks + 16, rig.args.prefill_blocks + 32))
    rig.compute(blocks)
    saves = rig.saves(3, blocks)
    slow_work(rig.device)
    side.wait_for_save(KVTierMetadata(saves=saves, save_reqs=["P"]))
    in_flight = side.saver.in_flight() if side.saver else 0
    side.handle_preemptions(KVTierMetadata(preempted=["P"]))  # P's blocks are reused by the next forward
    for kv in rig.caches.values():
        kv[:, blocks].fill_(-3.0)
    assert stored_exactly(side, rig, [k for k, _ in saves]), "a reused block was overwritten during its copy"
    return {"blocks": len(blocks), "copies_in_flight_at_fence": in_flight}


def load_and_compare(rig: Rig, side: WorkerSide, spec: LoadSpec, sources: list[int]) -> None:
    side.start_load_kv(KVTierMetadata(loads=[spec]))
    if spec.is_async:
        deadline, done = time.monotonic() + 60, None
        while not done and time.monotonic() < deadline:
            done = side.get_finished(set())[1]
        assert done == {spec.req_id}, f"async load not reported: {done}"
    for src, dst in zip(sources, spec.block_ids):
        assert np.array_equal(rig.device_bytes(dst), rig.expected[src]), f"block {dst} differs from {src}"
        rig.expected[dst] = rig.expected[src]
    side.wait_for_save(KVTierMetadata())


def check_loads(rig: Rig, side: WorkerSide) -> dict[str, Any]:
    n, far = rig.args.prefill_blocks, rig.args.num_blocks - rig.args.prefill_blocks - 24
    keys = [(1 << 32 | b).to_bytes(16, "little") for b in range(n)]
    for kv in rig.caches.values():  # the target blocks hold something else first
        kv[:, far:far + n].fill_(5.0)
    start = time.perf_counter()
    load_and_compare(rig, side, LoadSpec("C", keys, list(range(far, far + n))), list(range(n)))
    sync_ms = (time.perf_counter() - start) * 1e3
    decode_keys = [(2 << 32 | b).to_bytes(16, "little") for b in range(n, n + 16)]
    load_and_compare(rig, side, LoadSpec("D", decode_keys, list(range(far + n, far + n + 16)), is_async=True),
                     list(range(n, n + 16)))
    broken = keys[:4] + [b"\xee" * 16] + keys[5:8]
    side.start_load_kv(KVTierMetadata(loads=[LoadSpec("E", broken, list(range(far + n + 16, far + n + 24)))]))
    errors = side.take_load_errors()
    assert errors == set(range(far + n + 20, far + n + 24)), f"load errors {sorted(errors)}"
    side.wait_for_save(KVTierMetadata())
    return {"sync_blocks": n, "sync_load_ms": round(sync_ms, 2), "async_blocks": 16, "failed_reported": len(errors)}


def check_bounded_staging(rig: Rig) -> dict[str, Any]:
    block_bytes = sum(kv[:, 0].numel() * 2 for kv in rig.caches.values())
    side = rig.worker(staging_bytes=4 * 2 * block_bytes + 1024, staging_chunk_bytes=2 * block_bytes)
    assert side.pool is not None and side.pool.count == 4
    blocks = list(range(8, 20))
    rig.compute(blocks)
    start = time.perf_counter()
    side.wait_for_save(KVTierMetadata(saves=rig.saves(4, blocks), save_reqs=["F"]))  # 4 of 12 fit
    issue_ms = (time.perf_counter() - start) * 1e3
    dropped = side.counters.values().get("staging_dropped_blocks", 0)
    direct = side.copier is not None and side.copier.direct  # host caches (CPU dry run): saves skip staging
    assert dropped == (0 if direct else 8), f"dropped {dropped}"
    side.drain(60)
    keys = [(1 << 32 | b).to_bytes(16, "little") for b in range(8)]
    for key in keys:  # a load larger than the pool goes through in rounds (back-pressure)
        side.stack.put(key, memoryview(rig.by_key[key]))
    far = rig.args.num_blocks - 8
    load_and_compare(rig, side, LoadSpec("G", keys + keys, list(range(far - 8, far + 8))), list(range(8)) * 2)
    side.shutdown()
    return {"save_dropped": dropped, "direct": direct, "wait_for_save_ms": round(issue_ms, 3),
            "load_rounds_blocks": 16}


def check_shutdown_in_flight(rig: Rig) -> dict[str, Any]:
    side = rig.worker(save_timeout_s=2.0, staging_bytes="256MiB")
    blocks = list(range(rig.args.prefill_blocks))
    rig.compute(blocks)
    slow_work(rig.device)
    side.wait_for_save(KVTierMetadata(saves=rig.saves(5, blocks), save_reqs=["S"]))
    start = time.perf_counter()
    side.shutdown()
    seconds = time.perf_counter() - start
    assert seconds < 2.0 + 1.0, f"shutdown took {seconds:.1f} s"
    return {"shutdown_s": round(seconds, 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                               "torch": torch.__version__, "layers": args.layers, "block_size": args.block_size,
                               "checks": {}}
    with tempfile.TemporaryDirectory(prefix="kvtier-gpu-check-") as tmp:
        rig = Rig(args, Path(tmp))
        side = rig.worker(staging_bytes="512MiB")
        results["staging"] = {"chunks": side.pool.count if side.pool else 0,
                              "pinned": bool(side.pool and side.pool.pinned)}
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("prefill save, delayed release", lambda: check_prefill_save_and_delayed_release(rig, side)),
            ("decode saves, two requests", lambda: check_decode_saves(rig, side)),
            ("preemption fence", lambda: check_preemption_fence(rig, side)),
            ("sync, async and failed loads", lambda: check_loads(rig, side)),
            ("bounded staging", lambda: check_bounded_staging(rig)),
            ("shutdown with copies in flight", lambda: check_shutdown_in_flight(rig)),
        ]
        for name, step in steps:
            results["checks"][name] = one(name, step)
        side.shutdown()
    results["passed"] = all(c["ok"] for c in results["checks"].values())
    return results


def one(name: str, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        detail = step()
    except Exception as exc:
        traceback.print_exc()
        print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    detail["seconds"] = round(time.perf_counter() - start, 2)
    print(f"PASS {name} {json.dumps(detail)}", flush=True)
    return {"ok": True, **detail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="4 layers, small heads (CI on CPU)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is false")
    args.block_size, args.num_blocks = 16, 512
    args.layers, args.heads, args.head_size = (4, 2, 64) if args.quick else (32, 8, 128)
    args.prefill_blocks, args.dram_mib = 64, 512
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print("gpu_check:", "all passed" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
