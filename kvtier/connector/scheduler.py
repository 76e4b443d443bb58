"""Scheduler-side connector: prefix lookup, load and save plans, placement index fed by the workers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvtier.config import KVTierConfig
from kvtier.connector.identity import embeddings_extra, request_identity, reusable
from kvtier.connector.metadata import KVTierMetadata, KVTierWorkerMeta, LoadSpec
from kvtier.connector.placement import PlacementIndex, StartupPlacement
from kvtier.keys import KeyChain, ModelFingerprint
from kvtier.plugins import TIERS
from kvtier.sharing import SharedPlacement

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.scheduler")


@dataclass
class _ReqState:
    request: Request
    chain: KeyChain
    block_ids: list[int] = field(default_factory=list)
    pending_load: tuple[int, int] | None = None  # (first block, end block) from get_num_new_matched_tokens
    next_save_block: int = 0
    hit_tiers: dict[str, int] = field(default_factory=dict)
    saves_planned: int = 0
    saving: bool = False  # saves planned since its blocks were allocated: delay their release (saving.py)
    asked_shared: int = 0  # blocks already looked up in the shared index (asked once per request and length)


class SchedulerSide:
    def __init__(self, cfg: KVTierConfig, fingerprint: ModelFingerprint, block_size: int, world: int = 1,
                 copies_end_in_step: bool = False) -> None:
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.block_size = block_size
        # Host KV caches (the CPU build): the workers' save copies are done when the step that issued them returns,
        # so a finished request's blocks are never read afterwards and vLLM may free them at once. Holding them
        # one more step kept a waiting request out of a full KV space for that step (often a long prefill).
        self.delay_release = not copies_end_in_step
        # What vLLM's hit-source metrics call each tier ("host", "disk", "external"), declared by its class.
        self.tier_sources = {t.name: TIERS.resolve(t.kind, f"tiers[{i}].kind").hit_source
                             for i, t in enumerate(cfg.tiers)}
        self.index = PlacementIndex(world)  # shard key -> tier that holds it (as last reported)
        self.epoch = 0  # reset_cache epochs: part of every new request's keys
        self.pending_saves: set[bytes] = set()  # shard keys planned for saving, not reported yet
        self._reqs: dict[str, _ReqState] = {}
        self._loads: list[LoadSpec] = []
        self._clear_next = False
        self._releases: list[str] = []  # finished requests whose block release waits for their save copies
        self.shared = self._shared_index(cfg)

    @staticmethod
    def _shared_index(cfg: KVTierConfig) -> SharedPlacement | None:
        """The live placement index of the shared tiers, when one is configured (kvtier/sharing.py)."""
        shared = [t.name for i, t in enumerate(cfg.tiers) if TIERS.resolve(t.kind, f"tiers[{i}].kind").shared]
        if not cfg.placement_index.url or not shared:
            return None
        return SharedPlacement(cfg.placement_index, shared)

    def learn_startup(self, reports: Iterable[StartupPlacement]) -> None:
        """What the workers' persistent tiers held at start-up (vLLM's handshake channel)."""
        for report in reports:
            self.index.learn(report.events())
        if len(self.index):
            log.info("kvtier: %d stored blocks found on persistent tiers", len(self.index))

    def _state(self, request: Request) -> _ReqState:
        state = self._reqs.get(request.request_id)
        if state is None:
            chain = KeyChain(self.fingerprint, self.block_size, identity=request_identity(request, self.epoch),
                             block_extra=embeddings_extra(request, self.block_size))
            state = _ReqState(request, chain)
            self._reqs[request.request_id] = state
        return state

    # ---- lookup ------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        state = self._state(request)
        state.pending_load = None
        if not reusable(request):
            return 0, False  # multimodal inputs change KV without changing token ids: never reuse
        # vLLM must compute at least the last prompt token itself.
        max_blocks = (request.num_tokens - 1) // self.block_size
        keys = state.chain.extend(list(request.all_token_ids[:max_blocks * self.block_size]))
        hit = 0
        for key in keys[:max_blocks]:
            if self._where(key) is None:
                break
            hit += 1
        if hit < max_blocks and self.shared is not None and state.asked_shared < max_blocks:
            hit = self._ask_shared(keys[hit:max_blocks], hit)  # blocks other engines stored since we started
            state.asked_shared = max_blocks
        first = num_computed_tokens // self.block_size
        if hit <= first or hit - first < self.cfg.connector.min_hit_blocks:
            return 0, False
        state.pending_load = (first, hit)
        return hit * self.block_size - num_computed_tokens, self.cfg.connector.async_load

    def _ask_shared(self, keys: list[bytes], hit: int) -> int:
        """One round trip to the shared index for every rank's shard of ``keys``; what it lists goes into the
        local index (as placement events) and extends the hit while every shard of a block is listed."""
        assert self.shared is not None
        shards = [shard for key in keys for shard in self.index.shard_keys(key)]
        found = self.shared.lookup(shards)
        self.index.apply(found.items())
        for key in keys:
            if self._where(key) is None:
                break
            hit += 1
        return hit

    def _where(self, key: bytes) -> str | None:
        """The tier that holds block ``key`` on every rank, or the top tier while its save is still landing
        there (the worker waits for an unfinished save before loading): a request that repeats one that
        just ended, with no step in between to report the saves, still hits."""
        held = self.index.holder(key)
        if held is None and all(shard in self.pending_saves for shard in self.index.shard_keys(key)):
            return self.cfg.tiers[0].name
        return held

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        state = self._state(request)
        state.saving = False  # new blocks (first allocation, or after a preemption): no copy reads them yet
        if num_external_tokens == 0 or state.pending_load is None:
            state.pending_load = None
            return
        first, end = state.pending_load
        state.pending_load = None
        block_ids = list(blocks.get_block_ids()[0])
        state.block_ids = block_ids
        keys = state.chain.keys[first:end]
        state.hit_tiers = {}
        for key in keys:
            tier = self._where(key) or "?"
            state.hit_tiers[tier] = state.hit_tiers.get(tier, 0) + self.block_size
        self._loads.append(LoadSpec(request.request_id, list(keys), block_ids[first:end],
                                    self.cfg.connector.async_load))
        state.next_save_block = max(state.next_save_block, end)

    def hit_sources(self, request: Request) -> dict[str, int]:
        state = self._reqs.get(request.request_id)
        return dict(state.hit_tiers) if state else {}

    # ---- per-step plan -----------------------------------------------------------------------------
    def build_connector_meta(self, so: SchedulerOutput) -> KVTierMetadata:
        meta = KVTierMetadata(loads=self._loads, clear_store=self._clear_next, release_after_saves=self._releases,
                              preempted=sorted(getattr(so, "preempted_req_ids", None) or ()),
                              idle=getattr(so, "total_num_scheduled_tokens", None) == 0)
        self._loads = []
        self._clear_next = False
        self._releases = []
        for req_id in meta.preempted:  # their blocks are freed; the worker fences the copies out of them
            if req_id in self._reqs:
                self._reqs[req_id].saving = False
        for new in so.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan_saves(state, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id], meta)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            self._plan_saves(state, cached.num_computed_tokens[i] + so.num_scheduled_tokens[req_id], meta)
        return meta

    def _plan_saves(self, state: _ReqState, tokens_after_step: int, meta: KVTierMetadata) -> None:
        request = state.request
        if not reusable(request):
            return  # its keys would not say what its KV holds: never store it
        limit = tokens_after_step
        if not self.cfg.connector.save_decode_blocks:
            limit = min(limit, request.num_prompt_tokens)
        full = min(limit // self.block_size, len(state.block_ids))
        if full <= state.next_save_block:
            return
        keys = state.chain.extend(list(request.all_token_ids[:full * self.block_size]))
        for b in range(state.next_save_block, full):
            key = keys[b]
            shards = self.index.shard_keys(key)
            if self.index.holder(key) is not None or any(shard in self.pending_saves for shard in shards):
                continue
            self.pending_saves.update(shards)
            meta.saves.append((key, state.block_ids[b]))
            if not meta.save_reqs or meta.save_reqs[-1] != request.request_id:
                meta.save_reqs.append(request.request_id)  # the copies of this step read its blocks
            state.saving = True
            if b == 0:  # sink and prefix links, for attention-aware policies
                meta.sinks.append(key)
            else:
                meta.links.append((key, keys[b - 1]))
            state.saves_planned += 1
        state.next_save_block = full

    # ---- feedback from workers ---------------------------------------------------------------------
    def update_connector_output(self, worker_meta: object) -> None:
        if not isinstance(worker_meta, KVTierWorkerMeta):
            return
        for key, _ in worker_meta.events:
            self.pending_saves.discard(key)
        self.index.apply(worker_meta.events)

    def request_finished(self, request: Request) -> bool:
        """True when vLLM must keep the request's blocks until the worker reports it in finished_sending:
        copies out of them may still be in flight (announced to the workers in the next step's metadata).
        Never with host KV caches, whose copies end within the step that issued them."""
        state = self._reqs.pop(request.request_id, None)
        delay = state is not None and state.saving and self.delay_release
        if delay:
            self._releases.append(request.request_id)
        if state is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("request %s: %s", request.request_id, json.dumps({
                "prompt_tokens": request.num_prompt_tokens, "output_tokens": request.num_output_tokens,
                "hit_tokens_by_tier": state.hit_tiers, "blocks_saved": state.saves_planned,
                "index_blocks": len(self.index)}))
        return delay

    def shutdown(self) -> None:
        if self.shared is not None:
            log.info("kvtier: placement index lookups %s, latency %s ms", self.shared.counters,
                     self.shared.latency_ms())
            self.shared.close()

    def reset_cache(self) -> bool:
        """Forget everything stored: a new key epoch makes all earlier blocks unreachable from this engine at
        once (other engines keep theirs); the workers then free their local tiers in the background."""
        self.epoch += 1
        self.index.clear()
        self.pending_saves.clear()
        self._clear_next = True
        return True
