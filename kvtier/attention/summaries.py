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

    def add(self, layers: slice | int, keys: torch.Tensor, blocks: torch.Tensor,
            restart: torch.Tensor | None) -> None:
        """Fold ``keys`` (``[L, T, Hkv, d]`` for a slice of layers, ``[T, Hkv, d]`` for one) written into
        ``blocks [T]``; ``restart`` blocks (rewritten from offset 0) begin from zero. ``count`` is not touched:
        it is shared by the layers and advanced once per step (``count_tokens``)."""
        dim = 1 if isinstance(layers, slice) else 0
        summary = (self.sum[layers], self.sumsq[layers], self.inv[layers])
        if restart is not None:
            for t in summary:
                t.index_fill_(dim, restart, 0.0)
        summary[0].index_add_(dim, blocks, keys)
        summary[1].index_add_(dim, blocks, keys * keys)
        summary[2].index_add_(dim, blocks, 1.0 / keys.norm(dim=-1).clamp_min(1e-6))

    def count_tokens(self, blocks: torch.Tensor, restart: torch.Tensor | None) -> None:
        if restart is not None:
            self.count[restart] = 0.0
        self.count.index_add_(0, blocks, torch.ones_like(blocks, dtype=self.count.dtype))

    def snapshot(self, block_id: int) -> tuple[float, torch.Tensor]:
        """A block's token count and its summaries of every layer on the host, ``[L, Hkv, 2d+1]``."""
        rows = torch.cat([self.sum[:, block_id], self.sumsq[:, block_id], self.inv[:, block_id][..., None]], 2)
        return float(self.count[block_id]), rows.cpu()

    def load(self, block_id: int, count: float, rows: torch.Tensor) -> None:
        """Put a ``snapshot`` back, into ``block_id``."""
        rows = rows.to(self.sum.device)
        d = self.sum.shape[3]
        self.count[block_id] = count
        self.sum[:, block_id], self.sumsq[:, block_id] = rows[..., :d], rows[..., d:2 * d]
        self.inv[:, block_id] = rows[..., 2 * d]

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
    """What a step's metadata says, worked out once and shared by every layer: ``query_start_loc`` and
    ``seq_lens`` as lists, the valid-slot mask, the written tokens' blocks, the blocks restarted at offset 0
    and, with an exact-key store, which tokens have a row (``held``) with those rows and offsets."""

    def __init__(self, qsl: list[int], lens: list[int], valid: torch.Tensor, all_valid: bool, blocks: torch.Tensor,
                 top: int, restart: torch.Tensor | None) -> None:
        self.qsl, self.lens = qsl, lens
        self.valid, self.all_valid, self.blocks, self.top, self.restart = valid, all_valid, blocks, top, restart
        self.held: torch.Tensor | None = None
        self.rows = self.held_offsets = blocks
        self.counted = False  # count (shared by the layers) advanced for this step
        self.decode: tuple | None = None  # the sampled decode requests' tables (capture._decode_tables)
