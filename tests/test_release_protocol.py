"""The delayed-release protocol end to end: kvtier's SchedulerSide and WorkerSide driven by a small engine that
allocates and frees blocks the way vLLM 0.32's scheduler does (blocks freed on finish unless request_finished
said True, then on finished_sending; freed at once on preemption), with save copies held in flight and
completing in random order.

Invariant checked at every forward: no block the forward writes is read by a copy still in flight unless the
compute stream was told to wait for that copy. Also: finished_sending names only requests whose release was
delayed, each exactly once (vLLM asserts both), and every block comes back to the pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from copy_helpers import HeldFences, held_worker

from kvtier.config import KVTierConfig
from kvtier.connector.scheduler import SchedulerSide
from kvtier.keys import ModelFingerprint

BS, NUM_BLOCKS = 4, 64


@dataclass
class Req:
    rid: str
    tokens: list[int]
    prompt_len: int
    max_new: int
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    resumed: bool = False

    def ns(self) -> SimpleNamespace:
        return SimpleNamespace(request_id=self.rid, all_token_ids=self.tokens, num_tokens=len(self.tokens),
                               num_prompt_tokens=self.prompt_len, num_output_tokens=len(self.tokens) - self.prompt_len,
                               cache_salt=None, mm_features=None)


class Engine:
    def __init__(self, seed: int, fence_every_step: bool = False) -> None:
        self.rng = random.Random(seed)
        self.fences = HeldFences()
        self.worker, _, _ = held_worker(NUM_BLOCKS, self.fences, fence_every_step=fence_every_step,
                                        staging_bytes=64 * 1024)  # 60 chunks of 2 blocks: few saves dropped
        cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "4MiB"}],
                                      "connector": {"save_decode_blocks": True}}, env={})
        self.sched = SchedulerSide(cfg, ModelFingerprint(model="m", block_size=BS), BS)
        self.free = list(range(1, NUM_BLOCKS))
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.held: dict[str, Req] = {}  # finished, blocks kept until finished_sending
        self.finished_ids: set[str] = set()
        self.preempted: set[str] = set()
        self.copies: list[tuple[object, set[int]]] = []  # (fence, blocks it reads)
        self.planned = 0  # saves the scheduler planned

    def add(self, rid: str) -> None:
        prompt = [self.rng.randrange(1000) for _ in range(self.rng.randrange(5, 18))]
        self.waiting.append(Req(rid, prompt, len(prompt), self.rng.randrange(2, 9)))

    def alloc(self, req: Req, tokens: int) -> list[int] | None:
        need = -(-tokens // BS) - len(req.blocks)
        if need > len(self.free):
            return None
        new, self.free = self.free[:need], self.free[need:]
        req.blocks += new
        return new

    def schedule(self) -> SimpleNamespace:
        new_reqs, cached = [], SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[],
                                               num_computed_tokens=[])
        scheduled: dict[str, int] = {}
        if self.running and self.rng.random() < 0.25:  # preemption: blocks freed at once, no connector hook
            victim = self.running.pop(self.rng.randrange(len(self.running)))
            self.free += victim.blocks
            victim.blocks, victim.computed, victim.resumed = [], 0, True
            self.preempted.add(victim.rid)
            self.waiting.append(victim)
        for req in list(self.running):
            new = self.alloc(req, len(req.tokens) + 1)
            if new is None:
                continue
            req.tokens.append(self.rng.randrange(1000))
            cached.req_ids.append(req.rid)
            cached.new_block_ids.append((new,) if new else None)
            cached.num_computed_tokens.append(req.computed)
            scheduled[req.rid] = len(req.tokens) - req.computed
        for req in list(self.waiting):
            if self.alloc(req, len(req.tokens) + 1) is None:
                break
            self.waiting.remove(req)
            self.running.append(req)
            self.sched.get_num_new_matched_tokens(req.ns(), 0)
            self.sched.update_state_after_alloc(req.ns(), SimpleNamespace(get_block_ids=lambda r=req: (r.blocks,)), 0)
            scheduled[req.rid] = len(req.tokens)
            if req.resumed:
                cached.req_ids.append(req.rid)
                cached.resumed_req_ids.add(req.rid)
                cached.new_block_ids.append((list(req.blocks),))
                cached.num_computed_tokens.append(0)
            else:
                new_reqs.append(SimpleNamespace(req_id=req.rid, block_ids=(list(req.blocks),), num_computed_tokens=0))
        so = SimpleNamespace(scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached, num_scheduled_tokens=scheduled,
                             preempted_req_ids=self.preempted, finished_req_ids=self.finished_ids)
        self.preempted, self.finished_ids = set(), set()
        return so

    def written(self, so: SimpleNamespace) -> set[int]:
        """The blocks this step's forward writes: those holding the tokens it computes."""
        out: set[int] = set()
        for req in self.running:
            if req.rid in so.num_scheduled_tokens:
                first, end = req.computed, req.computed + so.num_scheduled_tokens[req.rid]
                out.update(req.blocks[t // BS] for t in range(first, end))
        return out

    def step(self) -> None:
        so = self.schedule()
        meta = self.sched.build_connector_meta(so)
        self.worker.handle_preemptions(meta)
        self.worker.start_load_kv(meta)
        for fence, blocks in self.copies:  # the forward: the invariant
            clash = blocks & self.written(so)
            assert fence.done() or fence.guards or not clash, f"blocks {clash} rewritten during their save copy"
        for req in self.running:
            req.computed += so.num_scheduled_tokens.get(req.rid, 0)
        made = len(self.fences.made)
        self.planned += len(meta.saves)
        self.worker.wait_for_save(meta)
        if len(self.fences.made) > made:
            self.copies.append((self.fences.made[-1], {block for _, block in meta.saves}))
        sending, _ = self.worker.get_finished(so.finished_req_ids, meta)
        for rid in sending or ():
            assert rid in self.held, f"finished_sending named {rid}, whose release was not delayed"
            self.free += self.held.pop(rid).blocks
        self.sched.update_connector_output(self.worker.build_worker_meta())
        self.finish_done()
        for fence, _ in self.copies:  # some copies complete, in any order
            if self.rng.random() < 0.3:
                fence.release()

    def finish_done(self) -> None:
        for req in [r for r in self.running if len(r.tokens) - r.prompt_len >= r.max_new]:
            self.running.remove(req)
            self.finished_ids.add(req.rid)
            if self.sched.request_finished(req.ns()):
                self.held[req.rid] = req
            else:
                self.free += req.blocks


@pytest.mark.parametrize("seed", range(8))
def test_no_block_is_rewritten_while_a_copy_reads_it(seed: int) -> None:
    engine = Engine(seed, fence_every_step=seed % 3 == 2)
    for i in range(24):
        engine.add(f"r{i}")
    steps = 0
    while engine.waiting or engine.running or engine.held:
        engine.step()
        steps += 1
        if steps > 400:
            engine.fences.release_all()  # let the tail drain
        assert steps < 600, "requests never finished"
    assert sorted(engine.free) == list(range(1, NUM_BLOCKS)), "blocks lost or freed twice"
    assert engine.worker.drain(5)
    counters = engine.worker.counters.values()
    assert counters.get("saved_blocks", 0) > 20  # every planned save is stored or dropped and counted
    assert counters.get("saved_blocks", 0) + counters.get("save_dropped_blocks", 0) == engine.planned
    engine.worker.shutdown()
