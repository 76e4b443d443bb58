"""Exact keys for the capture, within a byte budget, so earlier blocks need the Gaussian summaries less often.

Two halves of ``budget`` bytes:

- *rows*: one row per recently written or loaded vLLM block id, holding that block's keys (every layer,
  the dtype the model computes in), filled from the forward inputs as tokens are written. Rows are recycled
  least-recently-assigned first; a block id without a row falls back to its summary.
- *saved*: the keys of blocks the worker saved, by kvtier key (host memory), so a block that comes back by a
  load into another block id gets exact keys again.

A row's valid length is the block's token count kept by the capture (a write at offset 0 restarts it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


class HostLRU(Generic[V]):
    """Values by kvtier key within a byte budget, least recently used dropped first (a value bigger than the
    budget is not kept). Holds what a saved block needs when it is loaded again into another block id."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self._items: OrderedDict[bytes, tuple[V, int]] = OrderedDict()

    def put(self, key: bytes, value: V, nbytes: int) -> None:
        old = self._items.pop(key, None)
        self.bytes += nbytes - (old[1] if old is not None else 0)
        self._items[key] = (value, nbytes)
        while self.bytes > self.budget and self._items:
            self.bytes -= self._items.popitem(last=False)[1][1]

    def get(self, key: bytes) -> V | None:
        """The value of ``key`` (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]


class ExactKeys:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.rows = 0
        self.buf: torch.Tensor | None = None  # [layers, rows, block_size, Hkv, d]
        self._row_of: dict[int, int] = {}  # block id -> row, least recently assigned first
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._free: list[int] = []
        self._saved: HostLRU[torch.Tensor] = HostLRU(budget // 2)  # key -> [layers, n, Hkv, d] on host

    def setup(self, layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> None:
        per_block = layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        self.rows = (self.budget // 2) // per_block
        if self.rows:
            self.buf = torch.zeros(layers, self.rows, block_size, kv_heads, head_dim, dtype=dtype, device=device)
            self._free = list(range(self.rows - 1, -1, -1))

    def assign(self, block_ids: Iterable[int]) -> None:
        """Give each block id a row (recycling the least recently assigned) and mark it recently used."""
        if self.buf is None:
            return
        for block_id in block_ids:
            if block_id in self._row_of:
                self._lru.move_to_end(block_id)
                continue
            if not self._free:
                old, _ = self._lru.popitem(last=False)
                self._free.append(self._row_of.pop(old))
            self._row_of[block_id] = self._free.pop()
            self._lru[block_id] = None

    def drop(self, block_id: int) -> None:
        row = self._row_of.pop(block_id, None)
        if row is not None:
            del self._lru[block_id]
            self._free.append(row)

    def rows_for(self, blocks: torch.Tensor) -> torch.Tensor:
        """Row of each block id in ``blocks`` (-1 where none), computed once per step for every layer."""
        return torch.tensor([self._row_of.get(b, -1) for b in blocks.tolist()], dtype=torch.long,
                            device=blocks.device)

    def get(self, layer: int, block_id: int, count: int) -> torch.Tensor | None:
        row = self._row_of.get(block_id)
        if self.buf is None or row is None or count <= 0:
            return None
        return self.buf[layer, row, :count]

    def remember(self, key: bytes, block_id: int, count: int) -> None:
        row = self._row_of.get(block_id)
        if self.buf is None or row is None or count <= 0:
            return
        keys = self.buf[:, row, :count].to("cpu", copy=True)
        self._saved.put(key, keys, keys.nbytes)

    def restore(self, key: bytes, block_id: int) -> int:
        """Exact keys of ``key`` into ``block_id``'s row; returns their count (0: not held, row dropped)."""
        saved = self._saved.get(key)
        if self.buf is None or saved is None:
            self.drop(block_id)
            return 0
        self.assign([block_id])
        self.buf[:, self._row_of[block_id], :saved.shape[1]] = saved.to(self.buf.device)
        return int(saved.shape[1])
