"""Attention-score capture: the math against a direct softmax, the capture hook on a fake attention layer,
the wiring into tier policies (scores, sinks, tail-first links), and greedy outputs unchanged on real vLLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.attention.capture import AttentionCapture
from kvtier.attention.feed import ScoreFeed
from kvtier.attention.scores import (
    BlockStats,
    direct_block_mass,
    proxy_block_scores,
    relative_scores,
    stats_from_keys,
    window_block_mass,
)
from kvtier.config import AttentionConfig, KVTierConfig
from kvtier.tiers.stack import TierStack

BS = 8  # block size of the unit tests
SCALE = 0.3


def qk(n: int, w: int, hq: int = 4, hkv: int = 2, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(w, hq, d, generator=gen), torch.randn(n, hkv, d, generator=gen) * 1.5


# ---- the math --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,w,hq,hkv", [(37, 5, 4, 2), (16, 16, 2, 2), (9, 1, 4, 1), (64, 8, 8, 2)])
def test_exact_keys_match_a_direct_softmax(n: int, w: int, hq: int, hkv: int) -> None:
    q, k = qk(n, w, hq, hkv)
    q_pos = torch.arange(n - w, n)
    got = window_block_mass(q, q_pos, k, 0, BlockStats.empty(hkv, k.shape[2]), BS, SCALE)
    want = direct_block_mass(q, q_pos, k, BS, SCALE)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert math.isclose(float(got.sum()), hq * w, rel_tol=1e-5)  # every query's softmax sums to 1


def test_window_queries_inside_the_step_are_causally_masked() -> None:
    # The window's first query may not see the keys computed after it in the same step.
    q, k = qk(20, 6)
    q_pos = torch.arange(14, 20)
    got = window_block_mass(q, q_pos, k[10:], 10, stats_from_keys(k[:10], BS), BS, SCALE)
    only_first = window_block_mass(q[:1], q_pos[:1], k[10:15], 10, stats_from_keys(k[:10], BS), BS, SCALE)
    assert got.shape == (3,) and only_first.shape == (2,)
    assert float(only_first.sum()) == pytest.approx(4.0, rel=1e-5)


def test_block_summaries_are_exact_when_a_block_holds_one_key() -> None:
    # Earlier blocks enter through (count, mean, var); with identical keys inside each block the Gaussian
    # summary is exact, including a partial block that continues into the current step's keys.
    q, k = qk(30, 4)
    for b in range(3):
        k[b * BS:(b + 1) * BS] = k[b * BS]
    k[16:20] = k[16]
    q_pos = torch.arange(26, 30)
    got = window_block_mass(q, q_pos, k[20:], 20, stats_from_keys(k[:20], BS), BS, SCALE)
    want = direct_block_mass(q, q_pos, k, BS, SCALE)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_summaries_approximate_random_keys_and_unknown_blocks_get_nothing() -> None:
    q, k = qk(40, 8)
    q_pos = torch.arange(32, 40)
    prior = stats_from_keys(k[:32], BS)
    got = window_block_mass(q, q_pos, k[32:], 32, prior, BS, SCALE)
    want = direct_block_mass(q, q_pos, k, BS, SCALE)
    assert float((got.double() - want).abs().sum() / want.sum()) < 0.25  # a fallback, not exact
    prior.count[1] = 0.0  # block 1's keys are unknown (loaded, never seen)
    got = window_block_mass(q, q_pos, k[32:], 32, prior, BS, SCALE)
    assert got[1] == 0 and math.isclose(float(got.sum()), 32.0, rel_tol=1e-5)


def test_relative_and_proxy_scores() -> None:
    known = torch.tensor([True, True, False, True])
    rel = relative_scores(torch.tensor([2.0, 1.0, 5.0, 1.0]), known)
    assert rel.tolist() == pytest.approx([1.5, 0.75, 0.0, 0.75])
    assert relative_scores(torch.zeros(3), torch.ones(3, dtype=torch.bool)).tolist() == [0.0, 0.0, 0.0]
    proxy = proxy_block_scores(torch.tensor([0.2, 0.1, 0.3]), torch.ones(3, dtype=torch.bool))
    assert proxy.tolist() == pytest.approx([1.0, 0.5, 1.5])  # small key norms (large 1/||k||) rank high


# ---- the capture hook on a fake attention layer -------------------------------------------------------------

@dataclass
class FakeMeta:
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class FakeImpl:
    scale = SCALE

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return output


class FakeLayer:
    def __init__(self) -> None:
        self.impl = FakeImpl()


def step_meta(reqs: list[tuple[list[int], int, int]]) -> FakeMeta:
    """reqs: (block ids, tokens already computed, tokens computed this step) per request."""
    qsl, lens, slots = [0], [], []
    width = max(len(b) for b, _, _ in reqs)
    table = torch.zeros(len(reqs), width, dtype=torch.int32)
    for r, (blocks, done, n) in enumerate(reqs):
        table[r, :len(blocks)] = torch.tensor(blocks)
        qsl.append(qsl[-1] + n)
        lens.append(done + n)
        slots += [blocks[p // BS] * BS + p % BS for p in range(done, done + n)]
    return FakeMeta(qsl[-1], torch.tensor(qsl), torch.tensor(lens), table, torch.tensor(slots))


def run_layers(layers: dict[str, FakeLayer], meta: FakeMeta, q: torch.Tensor, k: torch.Tensor) -> None:
    for layer in layers.values():
        layer.impl.forward(layer, q, k, k, torch.empty(0), meta, torch.empty(0))


def test_capture_scores_a_prefill_exactly_and_a_later_decode_from_summaries() -> None:
    layers = {"l0": FakeLayer(), "l1": FakeLayer()}
    capture = AttentionCapture("window", window=4, every_n_steps=2, block_size=BS, num_blocks=16, credit="block")
    assert capture.install(layers, ["l0", "l1"]) == 2
    q, k = qk(22, 22)
    blocks = [5, 9, 2]
    # Step 0: a 20-token prefill into blocks 5, 9, 2 (the last one partial).
    run_layers(layers, step_meta([(blocks, 0, 20)]), q[:20], k[:20])
    scores, rewritten = capture.end_step()
    mass = direct_block_mass(q[16:20], torch.arange(16, 20), k[:20], BS, SCALE).float()
    want = relative_scores(mass, torch.ones(3, dtype=torch.bool))
    assert rewritten == {5, 9, 2}
    for layer in (0, 1):  # one score per layer; the fake layers see the same q and k
        assert [scores[b][layer] for b in blocks] == pytest.approx(want.tolist(), rel=1e-4)
    assert layers["l0"].impl.calls == 1
    # Step 1: one decode token; not sampled (every 2 steps), but its key is folded into block 2's summary.
    run_layers(layers, step_meta([(blocks, 20, 1)]), q[20:21], k[20:21])
    assert capture.end_step() == ({}, set())
    assert float(capture.layers["l0"].count[2]) == 5.0
    # Step 2: decode is due; earlier blocks' keys are still held exactly, so this matches a direct softmax.
    run_layers(layers, step_meta([(blocks, 21, 1)]), q[21:22], k[21:22])
    scores, _ = capture.end_step()
    mass = direct_block_mass(q[21:22], torch.tensor([21]), k[:22], BS, SCALE).float()
    want = relative_scores(mass, torch.ones(3, dtype=torch.bool))
    for layer in (0, 1):
        assert [scores[b][layer] for b in blocks] == pytest.approx(want.tolist(), rel=1e-3)
    assert capture.counters["prior_blocks_exact"] == 3 and capture.counters["prior_blocks_summary"] == 0


def test_without_key_memory_earlier_blocks_fall_back_to_summaries() -> None:
    layers = {"l0": FakeLayer()}
    capture = AttentionCapture("window", window=4, every_n_steps=1, block_size=BS, num_blocks=16, key_memory=0)
    capture.install(layers, ["l0"])
    q, k = qk(21, 21)
    run_layers(layers, step_meta([([5, 9, 2], 0, 20)]), q[:20], k[:20])
    capture.end_step()
    run_layers(layers, step_meta([([5, 9, 2], 20, 1)]), q[20:21], k[20:21])
    scores, _ = capture.end_step()
    assert set(scores) == {5, 9, 2} and sum(s[0] for s in scores.values()) == pytest.approx(3.0, rel=1e-4)
    assert capture.counters["prior_blocks_summary"] == 3


def test_request_credit_shares_the_mean_over_full_blocks_after_the_sink() -> None:
    layers = {"l0": FakeLayer()}
    capture = AttentionCapture("window", window=4, every_n_steps=1, block_size=BS, num_blocks=16)
    capture.install(layers, ["l0"])
    q, k = qk(30, 30)
    run_layers(layers, step_meta([([5, 9, 2, 7], 0, 30)]), q, k)
    scores, _ = capture.end_step()
    own = relative_scores(direct_block_mass(q[26:], torch.arange(26, 30), k, BS, SCALE).float(),
                          torch.ones(4, dtype=torch.bool)).tolist()
    assert scores[5][0] == pytest.approx(own[0], rel=1e-4) and scores[7][0] == pytest.approx(own[3], rel=1e-4)
    assert scores[9][0] == pytest.approx((own[1] + own[2]) / 2, rel=1e-4) == pytest.approx(scores[2][0], rel=1e-6)


@pytest.mark.parametrize("key_memory", [0, 2 * 5 * 2 * BS * 2 * 16 * 4, 1 << 20])  # no / some / all keys held
def test_batched_decode_scores_equal_scoring_one_request_at_a_time(key_memory: int) -> None:
    """Decode requests in one step are scored in one batched pass; it must give what the per-request
    path gives, with earlier blocks held exactly, summarised, partial and freshly started."""

    def run(batch: bool) -> tuple[list[dict[int, tuple[float, ...]]], dict[str, float]]:
        layers = {"l0": FakeLayer(), "l1": FakeLayer()}
        capture = AttentionCapture("window", window=4, every_n_steps=1, block_size=BS, num_blocks=64,
                                   key_memory=key_memory, credit="request")
        capture.batch_decode = batch
        capture.install(layers, list(layers))
        reqs = [([1, 2, 3], 20), ([4, 5, 6, 7], 24), ([8, 9], 9), ([10], 3), ([11, 12, 13], 16)]
        q, k = qk(40, 40)
        for i, (blocks, n) in enumerate(reqs):  # prefills, one per step
            run_layers(layers, step_meta([(blocks, 0, n)]), q[i:i + n], k[i:i + n])
            capture.end_step()
        steps = []
        for step in range(3):  # decode steps: one new token per request
            meta = step_meta([(blocks, n + step, 1) for blocks, n in reqs])
            run_layers(layers, meta, q[30 + step:35 + step], k[30 + step:35 + step])
            steps.append(capture.end_step()[0])
        return steps, capture.counters

    one_by_one, counters_one = run(batch=False)
    batched, counters_batched = run(batch=True)
    for expected, got in zip(one_by_one, batched, strict=True):
        assert set(got) == set(expected)
        assert [v for b in sorted(got) for v in got[b]] == pytest.approx(
            [v for b in sorted(got) for v in expected[b]], rel=1e-4)
    for name in ("prior_blocks_exact", "prior_blocks_summary", "sampled_requests"):
        assert counters_batched[name] == counters_one[name], name
    if key_memory == 0:
        assert counters_one["prior_blocks_exact"] == 0
    elif key_memory == 1 << 20:
        assert counters_one["prior_blocks_summary"] == 0
    else:
        assert counters_one["prior_blocks_exact"] > 0 and counters_one["prior_blocks_summary"] > 0


def test_capture_errors_disable_it_without_breaking_the_forward() -> None:
    layers = {"l0": FakeLayer()}
    capture = AttentionCapture("window", window=4, every_n_steps=1, block_size=BS)
    capture.install(layers, ["l0"])
    broken = step_meta([([1], 0, 4)])
    broken.slot_mapping = torch.tensor([1.5])  # nonsense metadata
    q, k = qk(4, 4)
    layers["l0"].impl.forward(layers["l0"], q, k, k, torch.empty(0), broken, torch.empty(0))
    assert not capture.enabled and layers["l0"].impl.calls == 1


# ---- wiring: scores, sinks and links reach the tier policies -------------------------------------------------

def dram_stack(policy: dict[str, Any], blocks: int) -> TierStack:
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": blocks * 64 * 1024, "policy": policy}]},
                                 env={})
    return TierStack.from_config(cfg)


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def feed_with_blocks(stack: TierStack, nblocks: int) -> tuple[ScoreFeed, AttentionCapture, dict[str, FakeLayer]]:
    feed = ScoreFeed(AttentionConfig(capture="window", window=4, every_n_steps=1, credit="block"), stack, BS, 64)
    layers = {"l0": FakeLayer()}
    feed.install(layers, ["l0"])
    assert feed.capture is not None
    return feed, feed.capture, layers


def test_scores_sinks_and_links_reach_the_policy_and_protections_hold() -> None:
    stack = dram_stack({"name": "attention-decay", "protect_recent": 0, "half_life_s": 1e9}, blocks=4)
    feed, _, layers = feed_with_blocks(stack, 4)
    # One 32-token prompt in blocks 1..4; the window's queries look hard at block 3 (index 2).
    q, k = qk(32, 32, hq=2, hkv=2)
    k[16:24] = q[28:].mean(0) * 4  # keys aligned with the window's queries (per head)
    run_layers(layers, step_meta([([1, 2, 3, 4], 0, 32)]), q, k)
    keys = [key(i) for i in range(4)]
    then = feed.on_step_end([(kk, i + 1) for i, kk in enumerate(keys)], [keys[0]],
                            [(keys[i], keys[i - 1]) for i in range(1, 4)])
    assert then is not None
    for i, kk in enumerate(keys):
        stack.put(kk, bytes(64 * 1024 - 100))  # the store job puts the blocks, then runs the update
    policy = stack.tiers[0].policy
    assert policy.score(keys[2]) == pytest.approx(1.0)  # nothing applied before the update runs
    then()
    assert policy.score(keys[2]) > 2.0 > policy.score(keys[1])
    # Tail first: the tail block 3 goes before block 2 though block 2 scores lower; block 0 (sink) stays.
    stack.put(key(9), bytes(64 * 1024 - 100))
    assert stack.where(keys[3]) is None and stack.where(keys[2]) is not None
    for i in (10, 11):
        stack.put(key(i), bytes(64 * 1024 - 100))
    assert stack.where(keys[0]) == "dram"


def test_loads_restore_summaries_and_rewrites_forget_block_keys() -> None:
    stack = dram_stack({"name": "attention"}, blocks=8)
    feed, capture, layers = feed_with_blocks(stack, 8)
    q, k = qk(16, 16)
    run_layers(layers, step_meta([([3, 4], 0, 16)]), q, k)
    assert feed.on_step_end([(key(1), 3), (key(2), 4)], [], []) is not None  # block credit: both scored
    before = capture.layers["l0"].sum[3].clone()
    # Later the same key is loaded into block 7: its summary and exact keys follow the key; an unknown key
    # starts empty.
    feed.on_loads([[(key(1), 7), (key(5), 8)]])
    assert torch.equal(capture.layers["l0"].sum[7], before) and float(capture.layers["l0"].count[8]) == 0.0
    assert capture.exact is not None
    held = capture.exact.get(0, 7, 8)
    assert held is not None and torch.allclose(held.float(), k[:8]) and capture.exact.get(0, 8, 8) is None
    # Block 3 is rewritten at offset 0 by another request: it no longer holds key(1).
    run_layers(layers, step_meta([([3], 0, 2)]), q[:2], k[:2])
    feed.on_step_end([], [], [])
    assert 3 not in feed._block_keys and feed._block_keys[4] == key(2)
    assert capture.enabled


def test_feed_is_not_created_for_policies_that_ignore_scores() -> None:
    assert ScoreFeed.create(AttentionConfig(capture="window"), dram_stack({"name": "lru"}, 2), BS, 8) is None
    assert ScoreFeed.create(AttentionConfig(capture="off"), dram_stack({"name": "attention"}, 2), BS, 8) is None


# ---- real vLLM: greedy tokens unchanged with capture on --------------------------------------------------

@pytest.mark.e2e
def test_greedy_outputs_unchanged_with_window_capture(tmp_path: Path) -> None:
    from e2e.run import full_blocks, run_driver

    from kvtier_bench.models import build_model

    model = build_model("tiny")
    script = {"model": model, "turns": 3, "system_len": 300, "question_len": 100, "max_tokens": 16,
              "repeat_after_reset": True}
    baseline = run_driver({**script, "reset": False})
    config = {"tiers": [{"kind": "dram", "capacity": "256MiB", "policy": {"name": "attention"}}],
              "attention": {"capture": "window", "window": 16, "every_n_steps": 1}}
    result = run_driver({**script, "kvtier": config})
    assert [t["output"] for t in result["turns"]] == [t["output"] for t in baseline["turns"]]
    assert [t["repeat_output"] for t in result["turns"]] == [t["repeat_output"] for t in baseline["turns"]]
    for turn in result["turns"]:
        assert turn["repeat_cached"] == full_blocks(turn["prompt_len"]), turn
    assert "attention capture mode window" in result["log"]
    assert "capture disabled" not in result["log"]


def test_shuffled_control_keeps_the_values_but_not_the_assignment() -> None:
    from kvtier_bench.controls import ShuffledScoresPolicy

    policy = ShuffledScoresPolicy(protect_recent=0, default_score=0.0, shuffle_seed=3, clock=lambda: 0.0)
    for i in range(40):
        policy.on_insert(key(i), 10)
    policy.update_scores({key(i): float(i) for i in range(40)})
    got = sorted(policy.score(key(i)) for i in range(40))
    assert set(got) <= {float(i) for i in range(40)}  # drawn from the reported values
    assert [policy.score(key(i)) for i in range(40)] != [float(i) for i in range(40)]


def test_host_lru_keeps_the_most_recently_used_within_its_byte_budget() -> None:
    from kvtier.attention.keystore import HostLRU

    cache: HostLRU[str] = HostLRU(10)
    cache.put(b"a", "A", 4)
    cache.put(b"b", "B", 4)
    assert cache.get(b"a") == "A"  # now the most recently used
    cache.put(b"c", "C", 4)  # 12 > 10: the least recently used (b) goes
    assert cache.get(b"b") is None and cache.get(b"a") == "A" and cache.get(b"c") == "C" and cache.bytes == 8
    cache.put(b"c", "C2", 2)  # replacing a key counts its new size only
    assert cache.bytes == 6 and cache.get(b"c") == "C2"
    cache.put(b"big", "X", 11)  # bigger than the budget: nothing else survives it, nor does it
    assert cache.bytes == 0 and cache.get(b"big") is None and cache.get(b"a") is None
