"""Attention-score capture inside the worker process, by wrapping each attention layer's ``impl.forward``.

vLLM calls ``layer.impl.forward(layer, query, key, value, kv_cache, attn_metadata, output, ...)`` for every
attention layer on both the CPU and the CUDA backends (eager or piecewise-compiled: attention stays outside
the graph). The wrapper calls the original first and then *reads* ``query`` ``[T, Hq, d]`` (after RoPE),
``key`` ``[T, Hkv, d]`` and the metadata (``query_start_loc``, ``seq_lens``, ``block_table``, ``slot_mapping``,
``num_actual_tokens``); it never writes a tensor vLLM uses, so outputs cannot change.

Keys are never decoded from the KV cache (the CPU cache is packed per ISA). Instead, per layer and per vLLM
block id, the capture keeps running key summaries (count, sum, sum of squares, sum of 1/||k||) fed from the
keys seen in forward inputs (slot_mapping says which block and offset each token went to; a write at offset
0 means the block was reallocated, so its summary restarts). Modes:

- ``window``: for each sampled request, the last ``window`` queries computed this step attend to the keys
  computed this step and to earlier blocks' keys while the exact-key store holds them (``keystore.py``,
  ``attention.key_memory``), exactly; other earlier blocks through their summaries (see ``scores.py``).
- ``proxy``: query-free; each block's mean inverse key norm.

A request is sampled in every step that computes more than one of its tokens (prefill, chunks) and, for
decode-only requests, every ``every_n_steps`` steps. Per block id, scores are relative to the request's
average block (1.0) and averaged over layers. Any error disables capture (logged once); vLLM carries on.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from kvtier.attention.keystore import ExactKeys
from kvtier.attention.scores import (
    BlockStats,
    decode_block_mass,
    proxy_block_scores,
    relative_scores,
    window_block_mass,
)

log = logging.getLogger("kvtier.attention")


class _LayerState:
    """Per-layer running key summaries, one row per vLLM block id."""

    def __init__(self, num_blocks: int, num_kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.count = torch.zeros(num_blocks, device=device)
        self.sum = torch.zeros(num_blocks, num_kv_heads, head_dim, device=device)
        self.sumsq = torch.zeros_like(self.sum)
        self.inv = torch.zeros(num_blocks, num_kv_heads, device=device)

    def grow(self, num_blocks: int) -> None:
        extra = num_blocks - self.count.shape[0]
        if extra > 0:
            self.count = torch.cat([self.count, self.count.new_zeros(extra)])
            self.sum = torch.cat([self.sum, self.sum.new_zeros(extra, *self.sum.shape[1:])])
            self.sumsq = torch.cat([self.sumsq, self.sumsq.new_zeros(extra, *self.sumsq.shape[1:])])
            self.inv = torch.cat([self.inv, self.inv.new_zeros(extra, *self.inv.shape[1:])])

    def stats(self, block_ids: torch.Tensor) -> BlockStats:
        count = self.count[block_ids]
        denom = count.clamp_min(1.0)[:, None, None]
        mean = self.sum[block_ids] / denom
        var = (self.sumsq[block_ids] / denom - mean * mean).clamp_min(0.0)
        return BlockStats(count, mean, var)


class _StepTokens:
    """This step's written tokens: the valid-slot mask, their blocks, the blocks restarted at offset 0 and,
    with an exact-key store, which tokens have a row (``held``) with those rows and offsets."""

    def __init__(self, valid: torch.Tensor, all_valid: bool, blocks: torch.Tensor, top: int,
                 restart: torch.Tensor | None) -> None:
        self.valid, self.all_valid, self.blocks, self.top, self.restart = valid, all_valid, blocks, top, restart
        self.held: torch.Tensor | None = None
        self.rows = self.held_offsets = blocks


class AttentionCapture:
    def __init__(self, mode: str, window: int, every_n_steps: int, block_size: int,
                 num_blocks: int | None = None, summary_bytes: int = 64 << 20, key_memory: int = 256 << 20,
                 credit: str = "request") -> None:
        if mode not in ("window", "proxy"):
            raise ValueError(f"attention.capture: expected window or proxy, got {mode!r}")
        if credit not in ("block", "request"):
            raise ValueError(f"attention.credit: expected block or request, got {credit!r}")
        self.mode = mode
        self.credit = credit
        self.window = max(1, int(window))
        self.every_n = max(1, int(every_n_steps))
        self.block_size = block_size
        self.num_blocks = num_blocks or 0
        self.enabled = True
        self.step = 0
        self.layers: dict[str, _LayerState] = {}
        self._order: list[str] = []
        self._step_sum: dict[int, float] = {}
        self._step_obs: dict[int, int] = {}
        self._rewritten: set[int] = set()
        self._meta_cache: tuple[int, Any, list[int], list[int]] | None = None
        self._saved: OrderedDict[bytes, tuple[float, torch.Tensor]] = OrderedDict()
        self._saved_bytes = 0
        self._summary_bytes = summary_bytes
        self.counters: dict[str, float] = {"capture_time_s": 0.0, "sampled_requests": 0, "scored_blocks": 0,
                                           "prior_blocks_exact": 0, "prior_blocks_summary": 0}
        self.exact = ExactKeys(key_memory) if mode == "window" and key_memory > 0 else None
        self._tokens_cache: tuple[int, Any, _StepTokens] | None = None
        self._decode_cache: tuple[int, tuple[Any, ...]] | None = None  # this step's decode tables, all layers
        self.batch_decode = True  # score sampled decode requests in one batched pass (False: one by one)

    # ---- installation ------------------------------------------------------------------------------
    def install(self, layers: Mapping[str, Any], names: Iterable[str]) -> int:
        """Wrap ``impl.forward`` of each named attention layer; returns how many were wrapped."""
        count = 0
        for name in names:
            layer = layers.get(name)
            impl = getattr(layer, "impl", None)
            if impl is None or getattr(impl, "_kvtier_wrapped", False) or not hasattr(impl, "forward"):
                continue
            scale = getattr(impl, "scale", None)
            impl.forward = self._wrap(name, impl.forward, float(scale) if scale else None)
            impl._kvtier_wrapped = True
            self._order.append(name)
            count += 1
        return count

    def _wrap(self, name: str, original: Any, scale: float | None) -> Any:
        def forward(layer: Any, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                    kv_cache: torch.Tensor, attn_metadata: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            if self.enabled and attn_metadata is not None and key is not None:
                start = time.perf_counter()
                try:
                    with torch.no_grad():
                        self.observe(name, query, key, attn_metadata, scale or query.shape[-1] ** -0.5)
                except Exception:  # capture must never take the engine down
                    self.enabled = False
                    log.exception("kvtier: attention capture failed in layer %s; capture disabled", name)
                self.counters["capture_time_s"] += time.perf_counter() - start
            return result

        return forward

    # ---- per layer, per step -----------------------------------------------------------------------
    def _lists(self, md: Any) -> tuple[list[int], list[int]]:
        """query_start_loc and seq_lens as Python lists, converted once per step (one sync on CUDA)."""
        cached = self._meta_cache
        if cached is not None and cached[0] == self.step and cached[1] is md:
            return cached[2], cached[3]
        qsl = md.query_start_loc.tolist()
        lens = md.seq_lens.tolist()
        self._meta_cache = (self.step, md, qsl, lens)
        return qsl, lens

    def observe(self, name: str, query: torch.Tensor, key: torch.Tensor, md: Any, scale: float) -> None:
        total = int(md.num_actual_tokens)
        if total <= 0:
            return
        keys = key[:total].float()
        state = self.layers.get(name)
        if state is None:
            state = _LayerState(max(self.num_blocks, 1), keys.shape[1], keys.shape[2], keys.device)
            self.layers[name] = state
            if self.exact is not None and len(self.layers) == 1:
                self.exact.setup(len(self._order), self.block_size, keys.shape[1], keys.shape[2], key.dtype,
                                 key.device)
        tokens = self._step_tokens(md, total)
        if tokens.top > state.count.shape[0]:
            state.grow(max(tokens.top, 2 * state.count.shape[0]))
        layer = self._order.index(name) if name in self._order else 0
        qsl, lens = self._lists(md)
        block_table = md.block_table
        if self.mode == "window":
            self._score_window(state, layer, query, keys, qsl, lens, block_table, scale)
        written = keys if tokens.all_valid else keys[tokens.valid]
        self._update(state, written, tokens)
        if self.exact is not None and self.exact.buf is not None and tokens.held is not None:
            self.exact.buf[layer, tokens.rows, tokens.held_offsets] = written[tokens.held].to(self.exact.buf.dtype)
        if self.mode == "proxy":
            self._score_proxy(state, qsl, lens, block_table)

    def _step_tokens(self, md: Any, total: int) -> _StepTokens:
        """Where this step's tokens were written (block, offset, exact-key row), worked out once per step and
        shared by every layer; blocks written at offset 0 were reallocated, so their summaries restart."""
        cached = self._tokens_cache
        if cached is not None and cached[0] == self.step and cached[1] is md:
            return cached[2]
        slots = md.slot_mapping[:total].long()
        valid = slots >= 0
        all_valid = bool(valid.all())
        if not all_valid:
            slots = slots[valid]
        blocks, offsets = slots // self.block_size, slots % self.block_size
        restart = blocks[offsets == 0]
        restarted = restart.tolist()
        self._rewritten.update(restarted)
        tokens = _StepTokens(valid, all_valid, blocks, int(blocks.max()) + 1 if blocks.numel() else 0,
                             restart if restarted else None)
        if self.exact is not None and self.exact.buf is not None:
            self.exact.assign(dict.fromkeys(blocks.tolist()))
            rows = self.exact.rows_for(blocks)
            held = rows >= 0
            tokens.held, tokens.rows, tokens.held_offsets = held, rows[held], offsets[held]
        self._tokens_cache = (self.step, md, tokens)
        return tokens

    def _sampled(self, qsl: list[int], lens: list[int]) -> Iterable[tuple[int, int, int, int]]:
        """(request row, first query token, query count, seq len) for the requests sampled this step."""
        decode_due = self.step % self.every_n == 0
        for r in range(len(qsl) - 1):
            n = qsl[r + 1] - qsl[r]
            if n > 1 or (n == 1 and decode_due):
                yield r, qsl[r], n, lens[r]

    def _score_window(self, state: _LayerState, layer: int, query: torch.Tensor, keys: torch.Tensor,
                      qsl: list[int], lens: list[int], block_table: torch.Tensor, scale: float) -> None:
        bs = self.block_size
        sampled = list(self._sampled(qsl, lens))
        decode = [(r, qs, seq_len) for r, qs, n, seq_len in sampled if n == 1] if self.batch_decode else []
        if decode:
            self._score_decode(state, layer, query, keys, decode, block_table, scale)
        for r, qs, n, seq_len in sampled:
            if decode and n == 1:
                continue
            first = seq_len - n
            prior_blocks = -(-first // bs)
            nb = -(-seq_len // bs)
            ids = block_table[r, :nb].long()
            prior = state.stats(ids[:prior_blocks])
            exact = torch.zeros(prior_blocks, dtype=torch.bool, device=keys.device)
            seg_keys, seg_pos = [], []
            if self.exact is not None:  # earlier blocks whose exact keys are still held
                for j, (block_id, count) in enumerate(zip(ids[:prior_blocks].tolist(),
                                                          prior.count.tolist(), strict=True)):
                    held = self.exact.get(layer, block_id, int(count))
                    if held is not None:
                        exact[j] = True
                        seg_keys.append(held.float())
                        seg_pos.append(torch.arange(j * bs, j * bs + int(count), device=keys.device))
            known = torch.ones(nb, dtype=torch.bool, device=keys.device)
            known[:prior_blocks] = (prior.count > 0) | exact
            if first % bs:
                known[prior_blocks - 1] = True  # partial block: its current-step tokens are exact
            prior.count = torch.where(exact, torch.zeros_like(prior.count), prior.count)
            if layer == 0:
                self.counters["prior_blocks_exact"] += int(exact.sum())
                self.counters["prior_blocks_summary"] += int((prior.count > 0).sum())
            seg_keys.append(keys[qs:qs + n])
            seg_pos.append(torch.arange(first, seq_len, device=keys.device))
            w = min(self.window, n)
            q_pos = torch.arange(seq_len - w, seq_len, device=query.device)
            mass = window_block_mass(query[qs + n - w:qs + n], q_pos, torch.cat(seg_keys), torch.cat(seg_pos),
                                     prior, bs, scale)
            self._accumulate(ids.tolist(), relative_scores(mass, known).tolist(), known.tolist(), seq_len // bs)

    def _decode_tables(self, state: _LayerState, decode: list[tuple[int, int, int]],
                       block_table: torch.Tensor, device: torch.device) -> tuple[Any, ...]:
        """Block ids, counts, exact-key rows and masks of this step's sampled decode requests; built at the
        first layer and shared by the others (every layer saw the same tokens)."""
        if self._decode_cache is not None and self._decode_cache[0] == self.step:
            return self._decode_cache[1]
        bs = self.block_size
        lens = torch.tensor([seq_len for _, _, seq_len in decode], device=device)
        width = int(-(-lens.max() // bs))
        rows_sel = torch.tensor([r for r, _, _ in decode], device=block_table.device)
        ids = block_table[rows_sel, :width].long().to(device)
        pos = torch.arange(width, device=device)[None, :]
        first = lens - 1  # one new token per request
        prior_blocks = ((first + bs - 1) // bs)[:, None]
        in_prior = pos < prior_blocks
        count = torch.where(in_prior, state.count[ids], torch.zeros((), device=device))
        rows = (self.exact.rows_for(ids.flatten()).view_as(ids) if self.exact is not None and self.exact.buf
                is not None else torch.full_like(ids, -1))
        exact = (rows >= 0) & (count > 0)
        known = (pos < ((lens + bs - 1) // bs)[:, None]) & (~in_prior | (count > 0))
        known |= (pos == prior_blocks - 1) & (first % bs != 0)[:, None]  # partial block: its new token is exact
        at = exact.nonzero(as_tuple=True)
        valid = torch.arange(bs, device=device)[None, :] < count[at][:, None]
        qs = torch.tensor([qs for _, qs, _ in decode], device=device)
        tables = (ids, rows, at, valid, torch.where(exact, torch.zeros((), device=device), count), known,
                  first // bs, qs, (lens // bs).tolist(), (-(-lens // bs)).tolist())
        self._decode_cache = (self.step, tables)
        self.counters["prior_blocks_exact"] += int(exact.sum())
        self.counters["prior_blocks_summary"] += int((tables[4] > 0).sum())
        return tables

    def _score_decode(self, state: _LayerState, layer: int, query: torch.Tensor, keys: torch.Tensor,
                      decode: list[tuple[int, int, int]], block_table: torch.Tensor, scale: float) -> None:
        """The window of sampled decode requests (one query each), batched: a few tensor ops per layer
        whatever the batch size, instead of a few dozen per request."""
        ids, rows, at, valid, count, known, cur_block, qs, full, nb = self._decode_tables(
            state, decode, block_table, keys.device)
        stats = state.stats(ids.flatten())
        shape = (*ids.shape, *stats.mean.shape[1:])
        held = (self.exact.buf[layer, rows[at]] if self.exact is not None and self.exact.buf is not None
                and at[0].numel() else keys.new_zeros(0, self.block_size, *keys.shape[1:]))
        mass = decode_block_mass(query[qs], keys[qs], cur_block, held, at, valid,
                                 BlockStats(count, stats.mean.view(shape), stats.var.view(shape)), scale)
        total = (mass * known).sum(1, keepdim=True)
        rel = torch.where(known & (total > 0), mass * known.sum(1, keepdim=True) / total.clamp_min(1e-30),
                          torch.zeros_like(mass))
        for i, (block_ids, values, ok) in enumerate(zip(ids.tolist(), rel.tolist(), known.tolist(), strict=True)):
            self._accumulate(block_ids[:nb[i]], values[:nb[i]], ok[:nb[i]], full[i])

    def _score_proxy(self, state: _LayerState, qsl: list[int], lens: list[int], block_table: torch.Tensor) -> None:
        for r, _, _, seq_len in self._sampled(qsl, lens):
            ids = block_table[r, :-(-seq_len // self.block_size)].long()
            count = state.count[ids]
            inv = state.inv[ids].sum(1) / (count.clamp_min(1.0) * state.inv.shape[1])
            known = count > 0
            self._accumulate(ids.tolist(), proxy_block_scores(inv, known).tolist(), known.tolist(),
                             seq_len // self.block_size)

    def _accumulate(self, ids: list[int], values: list[float], ok: list[bool], full: int) -> None:
        """Add one request's block scores to this step's. With ``credit == "request"`` the request's full
        blocks after the first share their mean score: a hit needs the whole prefix, so they live or die
        together, and which of them a question happened to look at says little about the prefix's worth;
        the first block (the sink) and the partial last block keep their own."""
        self.counters["sampled_requests"] += 1
        if self.credit == "request" and full > 1:
            pooled = [v for v, k in zip(values[1:full], ok[1:full], strict=True) if k]
            if pooled:
                values[1:full] = [sum(pooled) / len(pooled)] * (full - 1)
        for block_id, score, good in zip(ids, values, ok, strict=True):
            if good:
                self._step_sum[block_id] = self._step_sum.get(block_id, 0.0) + score
                self._step_obs[block_id] = self._step_obs.get(block_id, 0) + 1

    def _update(self, state: _LayerState, keys: torch.Tensor, tokens: _StepTokens) -> None:
        """Fold this step's (valid) keys into the block summaries; restarted blocks begin from zero."""
        if tokens.restart is not None:
            state.count[tokens.restart] = 0.0
            state.sum[tokens.restart] = 0.0
            state.sumsq[tokens.restart] = 0.0
            state.inv[tokens.restart] = 0.0
        b = tokens.blocks
        state.count.index_add_(0, b, torch.ones_like(b, dtype=state.count.dtype))
        state.sum.index_add_(0, b, keys)
        state.sumsq.index_add_(0, b, keys * keys)
        state.inv.index_add_(0, b, 1.0 / keys.norm(dim=-1).clamp_min(1e-6))

    # ---- step boundary and block identity ----------------------------------------------------------
    def end_step(self) -> tuple[dict[int, float], set[int]]:
        """This step's scores by block id (averaged over layer observations) and block ids restarted."""
        scores = {b: s / self._step_obs[b] for b, s in self._step_sum.items()}
        rewritten = self._rewritten
        self._step_sum, self._step_obs, self._rewritten = {}, {}, set()
        self.counters["scored_blocks"] += len(scores)
        self.step += 1
        return scores, rewritten

    def remember(self, pairs: Sequence[tuple[bytes, int]]) -> None:
        """Keep the summaries of saved blocks by key, so a later load into another block id restores them."""
        if not self.layers or not pairs:
            return
        states = [self.layers[n] for n in self._order if n in self.layers]
        for key, block_id in pairs:
            if block_id >= states[0].count.shape[0]:
                continue
            if self.exact is not None:
                self.exact.remember(key, block_id, int(states[0].count[block_id]))
            rows = torch.stack([torch.cat([s.sum[block_id], s.sumsq[block_id], s.inv[block_id][:, None]], 1)
                                for s in states]).cpu()
            old = self._saved.pop(key, None)
            if old is not None:
                self._saved_bytes -= old[1].nbytes
            self._saved[key] = (float(states[0].count[block_id]), rows)
            self._saved_bytes += rows.nbytes
        while self._saved_bytes > self._summary_bytes and self._saved:
            self._saved_bytes -= self._saved.popitem(last=False)[1][1].nbytes

    def restore(self, pairs: Sequence[tuple[bytes, int]]) -> None:
        """Blocks loaded into ``block_id``: use the remembered summaries of ``key``, else mark them unknown."""
        if not self.layers:
            return
        states = [self.layers[n] for n in self._order if n in self.layers]
        for key, block_id in pairs:
            if block_id >= states[0].count.shape[0]:
                for s in states:
                    s.grow(max(block_id + 1, 2 * s.count.shape[0]))
            saved = self._saved.get(key)
            if self.exact is not None:
                self.exact.restore(key, block_id)
            for i, s in enumerate(states):
                if saved is None:
                    s.count[block_id] = 0.0
                    continue
                rows = saved[1][i].to(s.sum.device)
                d = s.sum.shape[2]
                s.count[block_id] = saved[0]
                s.sum[block_id], s.sumsq[block_id] = rows[:, :d], rows[:, d:2 * d]
                s.inv[block_id] = rows[:, 2 * d]
            if saved is not None:
                self._saved.move_to_end(key)
