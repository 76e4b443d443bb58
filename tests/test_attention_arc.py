"""The ``attention`` policy (attention-aware ARC, kvtier/policies/attention_arc.py) and its reuse gate.

The generic contract (atomic evict, protection, sizes) runs in test_policy_contract.py for every registered
policy; here: it is exactly ARC when no scores and no links arrive, tails go before prefixes (also across T1 and
T2), the gate opens only for scores that predict reuse, and what it does to T1 while open.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvtier.config import PolicyConfig
from kvtier.errors import ConfigError
from kvtier.policies import make_policy
from kvtier.policies.arc import ARCPolicy
from kvtier.policies.attention_arc import AttentionARCPolicy
from kvtier.policies.base import score_value
from kvtier.policies.reuse_gate import ReuseGate, components


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


def policy(**params: Any) -> AttentionARCPolicy:
    made = make_policy(PolicyConfig(name="attention", params=params))
    assert isinstance(made, AttentionARCPolicy)
    return made


def drain(p: Any) -> list[bytes]:
    order: list[bytes] = []
    while victims := p.evict(1):
        order.extend(victims)
    return order


@pytest.mark.parametrize("seed", range(6))
def test_without_scores_or_links_it_is_arc(seed: int) -> None:
    # The same random inserts, hits, removals, protections and evictions drive ARC and this policy: with no
    # scores and no prefix links they must choose the same victims every time and hold the same keys.
    rng = random.Random(seed)
    arc, mine = ARCPolicy(), policy()
    for _ in range(3000):
        key, op = k(rng.randrange(60)), rng.random()
        if op < 0.4:
            size = rng.randrange(1, 50)
            arc.on_insert(key, size)
            mine.on_insert(key, size)
        elif op < 0.65:
            arc.on_access(key)
            mine.on_access(key)
        elif op < 0.7:
            arc.on_remove(key)
            mine.on_remove(key)
        elif op < 0.75:
            arc.protect([key])
            mine.protect([key])
        elif op < 0.8:
            arc.unprotect([key])
            mine.unprotect([key])
        else:
            need = rng.randrange(0, 200)
            assert sorted(mine.evict(need)) == sorted(arc.evict(need))  # ARC lists T1's victims first
        assert len(mine) == len(arc)
    assert mine.target_t1_bytes == arc.target_t1_bytes


def test_t1_chain_goes_tail_first_in_one_call() -> None:
    p = policy()
    for i in (0, 1, 2, 9):
        p.on_insert(k(i), 10)
    p.set_parent(k(1), k(0))
    p.set_parent(k(2), k(1))
    # LRU order is 0, 1, 2, 9, but 0 and 1 are prefixes of 2: the chain leaves tail first, all at once.
    assert p.evict(30) == [k(2), k(1), k(0)]
    assert drain(p) == [k(9)]


def test_an_old_t2_prefix_takes_its_fresh_t1_tail_with_it() -> None:
    # A chain 0 <- 1 was read twice (T2); later a new block 2 extends it (T1). A second chain 5 <- 6 is in T2
    # too, read more recently. When T2 must give up a block, the old chain goes (tail 2 first), not the newer
    # chain that happens to have no T1 tail.
    p = policy()
    for i in (0, 1, 5, 6):
        p.on_insert(k(i), 10)
    p.set_parent(k(1), k(0))
    p.set_parent(k(6), k(5))
    for i in (0, 1, 5, 6):
        p.on_access(k(i))
    p.on_insert(k(2), 10)
    p.set_parent(k(2), k(1))
    assert [p.list_of(k(i)) for i in (0, 1, 2, 5, 6)] == ["t2", "t2", "t1-low", "t2", "t2"]
    p.on_insert(k(7), 10)  # T1 = [2, 7]; evicting 20 bytes from T1 (p = 0) takes 2 then 7
    assert p.evict(20) == [k(2), k(7)]
    p.on_insert(k(2), 10)  # back (a B1 ghost hit: into T2, p grows)
    p.set_parent(k(2), k(1))
    assert p.evict(10) == [k(6)]  # T1 is empty: T2's least recent leaf-chain is 5 <- 6, tail first


def test_a_protected_tail_shields_its_prefix() -> None:
    p = policy()
    for i in range(3):
        p.on_insert(k(i), 10)
        p.on_access(k(i))  # all in T2
    p.set_parent(k(1), k(0))
    p.on_insert(k(5), 10)
    p.set_parent(k(5), k(1))  # a T1 tail under the T2 chain 0 <- 1
    p.protect([k(5)])
    assert p.evict(30) == []  # 2 alone is free; 0 and 1 wait for the protected 5
    assert p.evict(10) == [k(2)]
    p.unprotect([k(5)])
    assert p.evict(30) == [k(5), k(1), k(0)]


def _feed(p: AttentionARCPolicy, start: int, favoured_reused: bool, rounds: int = 12) -> None:
    """Rounds of 4 new one-block 'requests' with two score levels; the high-scored ones (or, with
    ``favoured_reused=False``, no particular ones) come back two rounds later."""
    rng = random.Random(start)
    pending: dict[int, list[int]] = {}
    key = start
    for rnd in range(rounds):
        for _ in range(4):
            high = rng.random() < 0.5
            p.on_insert(k(key), 1)
            p.update_scores({k(key): [2.0, 0.5] if high else [0.5, 0.5]})
            if (high if favoured_reused else rng.random() < 0.5):
                pending.setdefault(rnd + 2, []).append(key)
            key += 1
        for back in pending.pop(rnd, []):
            p.on_insert(k(back), 1) if k(back) not in p else p.on_access(k(back))


def test_gate_opens_for_scores_that_predict_reuse_and_stays_shut_otherwise() -> None:
    informative, noise = policy(), policy()
    _feed(informative, 0, favoured_reused=True)
    _feed(noise, 10_000, favoured_reused=False)
    assert informative.gate.is_open and informative.gate.horizon > 0
    stats = informative.gate.stats()
    assert stats["component"] in (0.0, 1.0) and stats["side"] == 1.0  # the mean or layer 0, high values
    assert not noise.gate.is_open and noise.gate.horizon == 0


def _teach(p: AttentionARCPolicy) -> None:
    """Blocks scored high come back three events after entering; blocks scored low never do."""
    for i in range(20):
        p.on_insert(k(1000 + i), 1)
        p.update_scores({k(1000 + i): 3.0 if i % 2 else 1.0})
        if i % 2 and i > 2:
            p.on_access(k(1000 + i - 2))


def test_open_gate_keeps_favoured_t1_blocks_until_the_horizon() -> None:
    p = policy(gate_z=0.0, gate_min_reuses=0.0)
    gate = p.gate
    _teach(p)
    assert gate.is_open and gate.horizon > 0
    drain(p)
    # T1 now: an old favoured block, then two newer plain ones: the plain ones go first.
    p.on_insert(k(1), 1)
    p.update_scores({k(1): 3.0})
    p.on_insert(k(2), 1)
    p.update_scores({k(2): 1.0})
    p.on_insert(k(3), 1)
    p.update_scores({k(3): 1.0})
    assert [p.list_of(k(i)) for i in (1, 2, 3)] == ["t1-high", "t1-low", "t1-low"]
    assert p.evict(2) == [k(2), k(3)]
    assert p.evict(1) == [k(1)]  # the other side is empty


def test_favoured_block_past_the_horizon_goes_first() -> None:
    p = policy(gate_z=0.0, gate_min_reuses=0.0)
    _teach(p)
    drain(p)
    horizon = p.gate.horizon
    p.on_insert(k(1), 1)
    p.update_scores({k(1): 3.0})
    for i in range(horizon + 1):  # time passes: T2 traffic only
        p.on_insert(k(2000 + i), 1)
        p.on_access(k(2000 + i))
    p.on_insert(k(2), 1)
    p.update_scores({k(2): 1.0})
    assert p.list_of(k(1)) == "t1-high"
    assert p.evict(1) == [k(1)]  # older than the horizon: no longer shielded


def test_blocks_reported_with_one_score_count_as_one_observation() -> None:
    gate = ReuseGate()
    gate.classify(k(1), (1.0,), 0.25, 0)
    stats = gate.stats()
    assert stats["reuses"] == 0.0
    for i in range(2, 5):
        gate.classify(k(i), (1.0,), 0.25, 0)
    for i in range(1, 5):
        gate.on_reference(k(i), 10)
    assert gate.stats()["reuses"] == pytest.approx(1.0)
    gate.on_reference(k(1), 11)  # only the first reference counts
    assert gate.stats()["reuses"] == pytest.approx(1.0)


def test_update_scores_groups_a_calls_equal_scores() -> None:
    p = policy()
    for i in range(4):
        p.on_insert(k(i), 1)
    p.update_scores({k(0): [1.0, 2.0], k(1): [1.0, 2.0], k(2): [1.0, 2.0], k(3): [0.5, 0.1]})
    part = p.gate._parts[0]
    assert sum(part.classified) == pytest.approx(2.0, rel=1e-3)  # one request of three blocks + a single block
    p.update_scores({k(0): [9.0, 9.0]})  # a block's later scores are ignored
    assert sum(part.classified) == pytest.approx(2.0, rel=1e-3)


def test_score_helpers() -> None:
    assert score_value(2.5) == 2.5
    assert score_value([1.0, float("nan"), 3.0]) == 2.0
    assert score_value([float("nan")]) == 0.0
    assert components(4.0) == (4.0,)
    assert components([1.0, 3.0]) == (2.0, 1.0, 3.0)
    assert components([-1.0, float("nan")]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(("param", "value"), [("gate_z", "high"), ("gate_z", float("inf")), ("protect_recent", -1),
                                              ("max_ghosts", 1.5), ("gate_min_reuses", True)])
def test_rejects_bad_params_naming_them(param: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=param):
        make_policy(PolicyConfig(name="attention", params={param: value}))


def _evictable(key: bytes, blocked: set[bytes], children: dict[bytes, set[bytes]]) -> bool:
    return key not in blocked and all(_evictable(c, blocked, children) for c in children[key])


@pytest.mark.parametrize("seed", range(4))
def test_model_check_with_chains_scores_and_protection(seed: int) -> None:
    # Random inserts, hits, per-layer score reports, links (child i extends some j < i), protections and
    # evictions. After every evict: victims are unprotected, none leaves a held child behind, and [] comes only
    # when the evictable bytes (keys whose held descendants are all unprotected too) fall short.
    rng = random.Random(seed)
    p = policy(gate_z=1.0, gate_min_reuses=1.0)
    sizes: dict[bytes, int] = {}
    parent: dict[bytes, bytes] = {}
    protected: dict[bytes, int] = {}
    for _ in range(3000):
        i, op = rng.randrange(30), rng.random()
        key = k(i)
        if op < 0.3:
            if key not in sizes:
                parent.pop(key, None)
            sizes[key] = rng.randrange(1, 50)
            p.on_insert(key, sizes[key])
        elif op < 0.45:
            p.on_access(key)
        elif op < 0.55 and key in sizes and i > 0:
            parent[key] = k(rng.randrange(i))
            p.set_parent(key, parent[key])
        elif op < 0.65:
            p.update_scores({k(rng.randrange(30)): [rng.random() * 3, rng.random()] for _ in range(3)})
        elif op < 0.7:
            protected[key] = protected.get(key, 0) + 1
            p.protect([key])
        elif op < 0.75:
            if protected.get(key):
                protected[key] -= 1
            p.unprotect([key])
        else:
            need = rng.randrange(1, 150)
            held = set(sizes)
            blocked = {x for x in held if protected.get(x)}
            children = {q: {c for c in held if parent.get(c) == q} for q in held}
            victims = p.evict(need)
            if victims:
                assert len(victims) == len(set(victims)) and not set(victims) & blocked
                assert sum(sizes[v] for v in victims) >= need
                for v in victims:
                    del sizes[v]
                assert all(not (children[v] & set(sizes)) for v in victims)
            else:
                assert sum(sizes[x] for x in held if _evictable(x, blocked, children)) < need
        assert set(sizes) == {x for x in map(k, range(30)) if x in p}
