"""Copies held "in flight" on the CPU build: a fence factory whose fences complete only when a test says so.

On CPU the copies themselves are plain and complete when issued; these fences make the worker's asynchronous
bookkeeping (delayed release, out-of-order completion, back-pressure, shutdown) behave as it does while a
device copy is still running, and record every ``guard`` (a device stream told to wait for the copy).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from kvtier.config import KVTierConfig
from kvtier.connector.worker import WorkerSide


class HeldFence:
    def __init__(self) -> None:
        self._done = threading.Event()
        self.guards = 0

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def guard(self, stream: Any) -> None:
        self.guards += 1

    def release(self) -> None:
        self._done.set()


class HeldFences:
    """The fence factory: every fence it makes stays pending until released."""

    def __init__(self) -> None:
        self.made: list[HeldFence] = []

    def __call__(self, stream: Any) -> HeldFence:
        fence = HeldFence()
        self.made.append(fence)
        return fence

    def release_all(self) -> None:
        for fence in self.made:
            fence.release()


def cpu_caches(num_blocks: int, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """vLLM's CPU layout: per layer ``[num_blocks, kv_heads, block_size, 2 * head_size]`` bf16."""
    gen = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.attn": torch.randn(num_blocks, 2, 4, 16, generator=gen).to(torch.bfloat16)
            for i in range(layers)}


def held_worker(num_blocks: int = 64, fences: HeldFences | None = None, fence_every_step: bool = False,
                **connector: Any) -> tuple[WorkerSide, HeldFences, dict[str, torch.Tensor]]:
    """A worker over a DRAM tier whose copies stay in flight until released. Staging: chunks of 2 blocks."""
    fences = fences or HeldFences()
    caches = cpu_caches(num_blocks)
    block_bytes = sum(t[0].numel() * t.element_size() for t in caches.values())
    connector = {"staging_chunk_bytes": 2 * block_bytes, "staging_bytes": 8 * 2 * (block_bytes + 8) + 8,
                 "save_timeout_s": 1.0, **connector}
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "4MiB"}], "connector": connector}, env={})
    worker = WorkerSide(cfg, num_blocks, fences=fences, fence_every_step=fence_every_step)
    worker.register_kv_caches(caches)
    assert worker.pool is not None
    worker.pool.wait_s = 0.3
    return worker, fences, caches


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")
