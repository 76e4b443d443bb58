"""Per-block key summaries the attention capture keeps (see capture.py), and where a step's tokens went."""

from __future__ import annotations

import torch

from kvtier.attention.scores import BlockStats


class Summaries:
    """Running key summaries per vLLM block id for every layer: ``count [B]`` (shared: every layer sees the
    same tokens), ``sum``/``sumsq [L, B, Hkv, d]`` and ``inv [L, B, Hkv]`` (sum of 1/||k||)."""

    def __init__(self, layers: int, num_blocks: int, num_kv_heads: int, head_dim: int,
                 device: torch.device) -> None:
        self.count = torch.zeros(num_blocks, device=device)
        self.sum = torch.zeros(layers, num_blocks, num_kv_heads, head_dim, device=device)
        self.sumsq = torch.zeros_like(self.sum)
        self.inv = torch.zeros(layers, num_blocks, num_kv_heads, device=device)

    def grow(self, num_blocks: int) -> None:
        extra = num_blocks - self.count.shape[0]
        if extra > 0:
            self.count = torch.cat([self.count, self.count.new_zeros(extra)])
            self.sum, self.sumsq, self.inv = (torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], 1)
                                              for t in (self.sum, self.sumsq, self.inv))

    def stats(self, layer: int, block_ids: torch.Tensor) -> BlockStats:
        count = self.count[block_ids]
        denom = count.clamp_min(1.0)[:, None, None]
        mean = self.sum[layer, block_ids] / denom
        var = (self.sumsq[layer, block_ids] / denom - mean * mean).clamp_min(0.0)
        return BlockStats(count, mean, var)


class LayerState:
    """One layer's view of the summaries (what the scoring code reads)."""

    __slots__ = ("_layer", "_store")

    def __init__(self, store: Summaries, layer: int) -> None:
        self._store, self._layer = store, layer

    @property
    def count(self) -> torch.Tensor:
        return self._store.count

    @property
    def sum(self) -> torch.Tensor:
        return self._store.sum[self._layer]

    @property
    def sumsq(self) -> torch.Tensor:
        return self._store.sumsq[self._layer]

    @property
    def inv(self) -> torch.Tensor:
        return self._store.inv[self._layer]

    def stats(self, block_ids: torch.Tensor) -> BlockStats:
        return self._store.stats(self._layer, block_ids)


class StepTokens:
    """This step's written tokens: the valid-slot mask, their blocks, the blocks restarted at offset 0 and,
    with an exact-key store, which tokens have a row (``held``) with those rows and offsets."""

    def __init__(self, valid: torch.Tensor, all_valid: bool, blocks: torch.Tensor, top: int,
                 restart: torch.Tensor | None) -> None:
        self.valid, self.all_valid, self.blocks, self.top, self.restart = valid, all_valid, blocks, top, restart
        self.held: torch.Tensor | None = None
        self.rows = self.held_offsets = blocks
        self.counted = False  # count (shared by the layers) advanced for this step
