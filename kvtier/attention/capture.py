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
decode-only requests, every ``every_n_steps`` steps. Per block id and layer, scores are relative to the
request's average block (1.0); a block's score is the tuple of its layers' scores (policies that want one number
take the mean, ``kvtier.policies.base.score_value``: layers can disagree, e.g. on the trained benchmark model the
first layer's attention to a document tracks whether the question quotes it and the second layer's does not).
Any error disables capture (logged once); vLLM carries on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from kvtier.attention.keystore import ExactKeys, HostLRU
from kvtier.attention.scores import (
    BlockStats,
    decode_block_mass,
    proxy_block_scores,
    relative_scores,
    window_block_mass,
)
from kvtier.attention.summaries import LayerState, StepTokens, Summaries

log = logging.getLogger("kvtier.attention")


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
        self.layers: dict[str, LayerState] = {}
        self._order: list[str] = []
        self._step_sum: dict[int, list[float]] = {}  # block id -> per layer: sum of this step's scores
        self._step_obs: dict[int, list[int]] = {}  # block id -> per layer: how many scores were summed
        self._rewritten: set[int] = set()
        self._saved: HostLRU[tuple[float, torch.Tensor]] = HostLRU(summary_bytes)  # key -> Summaries.snapshot
        self.counters: dict[str, float] = {"capture_time_s": 0.0, "sampled_requests": 0, "scored_blocks": 0,
                                           "prior_blocks_exact": 0, "prior_blocks_summary": 0}
        self.exact = ExactKeys(key_memory) if mode == "window" and key_memory > 0 else None
        self._tokens_cache: tuple[int, Any, StepTokens] | None = None  # (step, metadata, what it says)
        self._store: Summaries | None = None
        # window mode folds a step's keys (of the cached step) into the summaries once, for all layers, when the
        # step is over
        self._pending: list[tuple[int, torch.Tensor]] = []
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
    def _cached_tokens(self, md: Any) -> StepTokens | None:
        cached = self._tokens_cache
        return cached[2] if cached is not None and cached[0] == self.step and cached[1] is md else None

    def observe(self, name: str, query: torch.Tensor, key: torch.Tensor, md: Any, scale: float) -> None:
        total = int(md.num_actual_tokens)
        if total <= 0:
            return
        keys = key[:total].float()
        if self._pending and self._cached_tokens(md) is None:
            self._flush()  # a new step began without end_step
        if self._store is None:
            self._store = Summaries(max(len(self._order), 1), max(self.num_blocks, 1), keys.shape[1],
                                     keys.shape[2], keys.device)
            if self.exact is not None:
                self.exact.setup(len(self._order), self.block_size, keys.shape[1], keys.shape[2], key.dtype,
                                 key.device)
        layer = self._order.index(name) if name in self._order else 0
        state = self.layers.get(name)
        if state is None:
            state = self.layers[name] = LayerState(self._store, layer)
        tokens = self._step_tokens(md, total)
        if tokens.top > self._store.count.shape[0]:
            self._store.grow(max(tokens.top, 2 * self._store.count.shape[0]))
        block_table = md.block_table
        written = keys if tokens.all_valid else keys[tokens.valid]
        if written.shape[0] != tokens.blocks.shape[0]:
            raise ValueError(f"slot_mapping covers {tokens.blocks.shape[0]} tokens, the step computed {total}")
        if self.mode == "window":
            self._score_window(state, layer, query, keys, tokens, block_table, scale)
            self._pending.append((layer, written))
        else:  # the proxy reads this step's keys: fold them in now
            self._fold([layer], written[None], tokens)
            self._score_proxy(state, layer, tokens, block_table)

    def _step_tokens(self, md: Any, total: int) -> StepTokens:
        """Where this step's tokens were written (block, offset, exact-key row), worked out once per step and
        shared by every layer; blocks written at offset 0 were reallocated, so their summaries restart."""
        cached = self._cached_tokens(md)
        if cached is not None:
            return cached
        slots = md.slot_mapping[:total].long()
        valid = slots >= 0
        all_valid = bool(valid.all())
        if not all_valid:
            slots = slots[valid]
        blocks, offsets = slots // self.block_size, slots % self.block_size
        restart = blocks[offsets == 0]
        restarted = restart.tolist()
        self._rewritten.update(restarted)
        tokens = StepTokens(md.query_start_loc.tolist(), md.seq_lens.tolist(), valid, all_valid, blocks,
                            int(blocks.max()) + 1 if blocks.numel() else 0, restart if restarted else None)
        if self.exact is not None and self.exact.buf is not None:
            self.exact.assign(dict.fromkeys(blocks.tolist()))
            rows = self.exact.rows_for(blocks)
            held = rows >= 0
            tokens.held, tokens.rows, tokens.held_offsets = held, rows[held], offsets[held]
        self._tokens_cache = (self.step, md, tokens)
        return tokens

    def _sampled(self, tokens: StepTokens) -> Iterable[tuple[int, int, int, int]]:
        """(request row, first query token, query count, seq len) for the requests sampled this step."""
        qsl, lens = tokens.qsl, tokens.lens
        decode_due = self.step % self.every_n == 0
        for r in range(len(qsl) - 1):
            n = qsl[r + 1] - qsl[r]
            if n > 1 or (n == 1 and decode_due):
                yield r, qsl[r], n, lens[r]

    def _score_window(self, state: LayerState, layer: int, query: torch.Tensor, keys: torch.Tensor,
                      tokens: StepTokens, block_table: torch.Tensor, scale: float) -> None:
        bs = self.block_size
        sampled = list(self._sampled(tokens))
        decode = [(r, qs, seq_len) for r, qs, n, seq_len in sampled if n == 1] if self.batch_decode else []
        if decode:
            self._score_decode(state, layer, query, keys, decode, tokens, block_table, scale)
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
            self._accumulate(layer, ids.tolist(), relative_scores(mass, known).tolist(), known.tolist(),
                             seq_len // bs)

    def _decode_tables(self, state: LayerState, decode: list[tuple[int, int, int]], tokens: StepTokens,
                       block_table: torch.Tensor, device: torch.device) -> tuple[Any, ...]:
        """Block ids, counts, exact-key rows and masks of this step's sampled decode requests; built at the
        first layer and shared by the others (every layer saw the same tokens)."""
        if tokens.decode is not None:
            return tokens.decode
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
        tokens.decode = tables
        self.counters["prior_blocks_exact"] += int(exact.sum())
        self.counters["prior_blocks_summary"] += int((tables[4] > 0).sum())
        return tables

    def _score_decode(self, state: LayerState, layer: int, query: torch.Tensor, keys: torch.Tensor,
                      decode: list[tuple[int, int, int]], tokens: StepTokens, block_table: torch.Tensor,
                      scale: float) -> None:
        """The window of sampled decode requests (one query each), batched: a few tensor ops per layer
        whatever the batch size, instead of a few dozen per request."""
        ids, rows, at, valid, count, known, cur_block, qs, full, nb = self._decode_tables(
            state, decode, tokens, block_table, keys.device)
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
            self._accumulate(layer, block_ids[:nb[i]], values[:nb[i]], ok[:nb[i]], full[i])

    def _score_proxy(self, state: LayerState, layer: int, tokens: StepTokens, block_table: torch.Tensor) -> None:
        for r, _, _, seq_len in self._sampled(tokens):
            ids = block_table[r, :-(-seq_len // self.block_size)].long()
            count = state.count[ids]
            inv = state.inv[ids].sum(1) / (count.clamp_min(1.0) * state.inv.shape[1])
            known = count > 0
            self._accumulate(layer, ids.tolist(), proxy_block_scores(inv, known).tolist(), known.tolist(),
                             seq_len // self.block_size)

    def _accumulate(self, layer: int, ids: list[int], values: list[float], ok: list[bool], full: int) -> None:
        """Add one request's block scores in one layer to this step's. With ``credit == "request"`` the
        request's full blocks after the first share their mean score: a hit needs the whole prefix, so they live
        or die together, and which of them a question happened to look at says little about the prefix's
        worth; the first block (the sink) and the partial last block keep their own."""
        self.counters["sampled_requests"] += 1
        if self.credit == "request" and full > 1:
            pooled = [v for v, k in zip(values[1:full], ok[1:full], strict=True) if k]
            if pooled:
                values[1:full] = [sum(pooled) / len(pooled)] * (full - 1)
        width = max(len(self._order), layer + 1)
        for block_id, score, good in zip(ids, values, ok, strict=True):
            if good:
                sums = self._step_sum.setdefault(block_id, [0.0] * width)
                obs = self._step_obs.setdefault(block_id, [0] * width)
                if len(sums) < width:
                    sums += [0.0] * (width - len(sums))
                    obs += [0] * (width - len(obs))
                sums[layer] += score
                obs[layer] += 1

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        tokens = self._tokens_cache[2] if self._tokens_cache is not None else None  # the step they belong to
        if not pending or tokens is None:
            return
        start = time.perf_counter()
        try:
            with torch.no_grad():
                self._fold([layer for layer, _ in pending], torch.stack([k for _, k in pending]), tokens)
        except Exception:  # like a failing hook: capture goes off, vLLM carries on
            self.enabled = False
            log.exception("kvtier: attention capture failed folding a step's keys; capture disabled")
        self.counters["capture_time_s"] += time.perf_counter() - start

    def _fold(self, layers: list[int], keys: torch.Tensor, tokens: StepTokens) -> None:
        """Fold a step's valid keys ``[len(layers), T, Hkv, d]`` into the summaries and the exact-key rows;
        blocks restarted at offset 0 begin from zero. All layers at once when ``layers`` is all of them."""
        store = self._store
        assert store is not None
        if not tokens.counted:
            tokens.counted = True
            store.count_tokens(tokens.blocks, tokens.restart)
        buf = self.exact.buf if self.exact is not None else None
        targets: list[tuple[slice | int, torch.Tensor]]
        if layers == list(range(store.sum.shape[0])):
            targets = [(slice(None), keys)]
        else:
            targets = [(layer, keys[i]) for i, layer in enumerate(layers)]
        for at, k in targets:
            store.add(at, k, tokens.blocks, tokens.restart)
            if buf is not None and tokens.held is not None:
                held = k[:, tokens.held] if isinstance(at, slice) else k[tokens.held]
                buf[at, tokens.rows, tokens.held_offsets] = held.to(buf.dtype)

    # ---- step boundary and block identity ----------------------------------------------------------
    def end_step(self) -> tuple[dict[int, tuple[float, ...]], set[int]]:
        """This step's scores by block id, one per layer (the mean of that layer's observations; NaN where the
        layer did not score the block), and the block ids restarted."""
        self._flush()
        scores = {b: tuple(total / n if n else math.nan for total, n in zip(sums, self._step_obs[b], strict=True))
                  for b, sums in self._step_sum.items()}
        rewritten = self._rewritten
        self._step_sum, self._step_obs, self._rewritten = {}, {}, set()
        self.counters["scored_blocks"] += len(scores)
        self.step += 1
        return scores, rewritten

    def remember(self, pairs: Sequence[tuple[bytes, int]]) -> None:
        """Keep the summaries of saved blocks by key, so a later load into another block id restores them."""
        self._flush()
        store = self._store
        if store is None or not pairs:
            return
        for key, block_id in pairs:
            if block_id >= store.count.shape[0]:
                continue
            count, rows = store.snapshot(block_id)
            if self.exact is not None:
                self.exact.remember(key, block_id, int(count))
            self._saved.put(key, (count, rows), rows.nbytes)

    def restore(self, pairs: Sequence[tuple[bytes, int]]) -> None:
        """Blocks loaded into ``block_id``: use the remembered summaries of ``key``, else mark them unknown."""
        self._flush()
        store = self._store
        if store is None:
            return
        for key, block_id in pairs:
            if block_id >= store.count.shape[0]:
                store.grow(max(block_id + 1, 2 * store.count.shape[0]))
            saved = self._saved.get(key)
            if self.exact is not None:
                self.exact.restore(key, block_id)
            if saved is None:
                store.count[block_id] = 0.0
                continue
            store.load(block_id, *saved)
