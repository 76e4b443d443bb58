"""One contract suite run against every registered eviction policy, then each policy's own behaviour.

The contract suite drives policies only through the EvictionPolicy API. Policy-internal protections (the
attention policies' recent window) are switched off in ``_contract_params`` so that "evict returns [] only
when there are not enough unprotected bytes" can be checked exactly; ``test_model_check_with_defaults``
runs every policy with its defaults, and the attention tests at the bottom cover those protections.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvtier.config import PolicyConfig
from kvtier.errors import ConfigError
from kvtier.policies import POLICY_NAMES, EvictionPolicy, make_policy
from kvtier.policies.arc import ARCPolicy
from kvtier.policies.attention import AttentionPolicy
from kvtier.policies.attention_arc import AttentionARCPolicy
from kvtier.policies.lfu import LFUPolicy
from kvtier.policies.lru import LRUPolicy


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _contract_params(name: str) -> dict[str, Any]:
    if name == "attention-decay":
        return {"protect_recent": 0, "clock": FakeClock()}
    return {"protect_recent": 0} if name == "attention" else {}


def make(name: str, **params: Any) -> EvictionPolicy:
    return make_policy(PolicyConfig(name=name, params={**_contract_params(name), **params}))


def drain(policy: EvictionPolicy) -> list[bytes]:
    """Evict one byte at a time until nothing more can go: the policy's full victim order."""
    order: list[bytes] = []
    while victims := policy.evict(1):
        order.extend(victims)
    return order


def fill(policy: EvictionPolicy, n: int, size: int = 10) -> None:
    for i in range(n):
        policy.on_insert(k(i), size)


all_policies = pytest.mark.parametrize("name", POLICY_NAMES)


# ---- contract ----------------------------------------------------------------------------------------

@all_policies
def test_insert_access_remove(name: str) -> None:
    policy = make(name)
    fill(policy, 3)
    assert len(policy) == 3 and all(k(i) in policy for i in range(3))
    policy.on_access(k(1))
    assert len(policy) == 3
    policy.on_remove(k(1))
    assert k(1) not in policy and len(policy) == 2
    policy.on_remove(k(1))  # removing twice is harmless
    assert len(policy) == 2


@all_policies
def test_untracked_access_and_remove_are_ignored(name: str) -> None:
    # Two identical histories; one also sees calls about keys it never held. Their victim orders match.
    touched, plain = make(name), make(name)
    for policy in (touched, plain):
        fill(policy, 5)
        policy.on_access(k(2))
    touched.on_access(k(99))
    touched.on_remove(k(98))
    assert k(99) not in touched and k(98) not in touched and len(touched) == 5
    assert drain(touched) == drain(plain)


@all_policies
def test_evict_zero_or_negative_returns_nothing(name: str) -> None:
    policy = make(name)
    fill(policy, 3)
    assert policy.evict(0) == [] and policy.evict(-5) == []
    assert len(policy) == 3


@all_policies
def test_evict_returns_enough_bytes_and_stops_tracking_them(name: str) -> None:
    policy = make(name)
    fill(policy, 20)
    victims = policy.evict(55)
    assert len(victims) == len(set(victims)) == 6  # 6 blocks of 10 bytes cover 55
    assert all(v not in policy for v in victims)
    assert len(policy) == 14


@all_policies
def test_failed_evict_changes_nothing(name: str) -> None:
    # Same history on two instances; one is asked for more than it can give. It must answer [] and then
    # behave exactly like the untouched twin (same members, same victim order).
    asked, twin = make(name), make(name)
    for policy in (asked, twin):
        fill(policy, 8)
        policy.on_access(k(3))
        policy.on_access(k(3))
        policy.protect([k(5)])
    assert asked.evict(80) == []  # only 70 unprotected bytes
    assert len(asked) == 8 and all(k(i) in asked for i in range(8))
    assert drain(asked) == drain(twin)


@all_policies
def test_protected_keys_are_never_evicted(name: str) -> None:
    policy = make(name)
    fill(policy, 6)
    policy.protect([k(0), k(1)])
    policy.protect([k(0)])
    policy.unprotect([k(0)])  # protection is counted: k(0) is still protected once
    assert policy.is_protected(k(0)) and policy.is_protected(k(1))
    victims = policy.evict(40)
    assert sorted(victims) == [k(i) for i in range(2, 6)]
    assert policy.evict(1) == []
    policy.unprotect([k(0), k(1)])
    assert sorted(policy.evict(20)) == [k(0), k(1)]


@all_policies
def test_reinsert_updates_size(name: str) -> None:
    policy = make(name)
    fill(policy, 6)
    policy.on_insert(k(0), 1000)
    policy.on_insert(k(0), 1000)
    assert len(policy) == 6
    victims = policy.evict(500)  # the 5 small blocks hold 50 bytes: only k(0) can cover 500
    assert k(0) in victims
    assert policy.evict(1001) == []  # k(0) is gone; the rest cannot cover it


def _run_model_check(name: str, seed: int, params: dict[str, Any], strict: bool) -> None:
    rng = random.Random(seed)
    policy = make_policy(PolicyConfig(name=name, params=params))
    sizes: dict[bytes, int] = {}
    protected: dict[bytes, int] = {}
    for _ in range(3000):
        key = k(rng.randrange(40))
        op = rng.random()
        if op < 0.35:
            sizes[key] = rng.randrange(1, 100)
            policy.on_insert(key, sizes[key])
        elif op < 0.55:
            policy.on_access(key)
        elif op < 0.65:
            sizes.pop(key, None)
            policy.on_remove(key)
        elif op < 0.72:
            protected[key] = protected.get(key, 0) + 1
            policy.protect([key])
        elif op < 0.80:
            if protected.get(key):
                protected[key] -= 1
            policy.unprotect([key])
        elif op < 0.85:
            policy.update_scores({k(rng.randrange(40)): rng.random() * 10 for _ in range(5)})
        else:
            need = rng.randrange(0, 400)
            victims = policy.evict(need)
            assert len(victims) == len(set(victims))
            assert all(v in sizes and not protected.get(v) for v in victims)
            evictable = sum(s for key_, s in sizes.items() if not protected.get(key_))
            if victims:
                assert sum(sizes[v] for v in victims) >= need
            elif strict:
                assert need == 0 or evictable < need
            for v in victims:
                del sizes[v]
        assert len(policy) == len(sizes)
        assert all(key_ in policy for key_ in sizes)


@all_policies
@pytest.mark.parametrize("seed", range(5))
def test_model_check_random_operations(name: str, seed: int) -> None:
    _run_model_check(name, seed, _contract_params(name), strict=True)


@all_policies
@pytest.mark.parametrize("seed", range(3))
def test_model_check_with_defaults(name: str, seed: int) -> None:
    _run_model_check(name, 100 + seed, {}, strict=False)


# ---- loader ------------------------------------------------------------------------------------------

def test_loader_accepts_module_class_reference() -> None:
    policy = make_policy(PolicyConfig(name="kvtier.policies.lru:LRUPolicy"))
    assert isinstance(policy, LRUPolicy)


@pytest.mark.parametrize(("name", "classes"), [("lru", LRUPolicy), ("lfu", LFUPolicy), ("arc", ARCPolicy),
                                               ("attention", AttentionARCPolicy),
                                               ("attention-decay", AttentionPolicy)])
def test_registered_names_load_their_classes(name: str, classes: type) -> None:
    assert type(make_policy(PolicyConfig(name=name))) is classes


def test_unknown_policy_name_names_it_and_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        make_policy(PolicyConfig(name="mru"), path="tiers[0].policy")
    message = str(err.value)
    assert "tiers[0].policy.name" in message and "'mru'" in message
    assert "lru" in message and "module:ClassName" in message


def test_unloadable_reference_and_unknown_param_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="kvtier.policies.lru:Nope"):
        make_policy(PolicyConfig(name="kvtier.policies.lru:Nope"))
    with pytest.raises(ConfigError, match="colour"):
        make_policy(PolicyConfig(name="lfu", params={"colour": "red"}))


# ---- policy-specific ---------------------------------------------------------------------------------

class SimTier:
    """A byte-capacity store that evicts through its policy, as tiers/base.py does (victims before insert)."""

    def __init__(self, policy: EvictionPolicy, capacity: int) -> None:
        self.policy, self.capacity = policy, capacity
        self.sizes: dict[bytes, int] = {}

    def put(self, key: bytes, size: int = 10) -> None:
        need = sum(self.sizes.values()) - self.sizes.get(key, 0) + size - self.capacity
        if need > 0:
            self.policy.protect([key])
            victims = self.policy.evict(need)
            self.policy.unprotect([key])
            assert victims, "policy found no room"
            for v in victims:
                del self.sizes[v]
        self.sizes[key] = size
        self.policy.on_insert(key, size)

    def get(self, key: bytes) -> bool:
        if key in self.sizes:
            self.policy.on_access(key)
            return True
        return False


def test_lru_evicts_least_recently_used_first() -> None:
    policy = make("lru")
    fill(policy, 4)
    policy.on_access(k(0))
    policy.on_access(k(2))
    assert drain(policy) == [k(1), k(3), k(0), k(2)]


def test_lfu_evicts_least_frequent_then_least_recent() -> None:
    policy = make("lfu")
    fill(policy, 4)  # all seen once; k(0) is the least recent of them
    for key, times in ((k(0), 3), (k(1), 1), (k(3), 1)):
        for _ in range(times):
            policy.on_access(key)
    assert isinstance(policy, LFUPolicy) and policy.frequency(k(0)) == 4
    # k(2): 1 touch; k(1) and k(3): 2 touches each, k(1) touched first; k(0): 4 touches.
    assert drain(policy) == [k(2), k(1), k(3), k(0)]


def test_lfu_decay_lets_old_favourites_go() -> None:
    # k(0) is hot early (7 touches), then k(1) gets 4. Halving every 8 touches (at k(1)'s insert: 7 -> 3)
    # lets k(0) go first; without decay k(0) would outlive k(1).
    orders = {}
    for decay_every in (0, 8):
        policy = make("lfu", decay_every=decay_every)
        policy.on_insert(k(0), 10)
        for _ in range(6):
            policy.on_access(k(0))
        policy.on_insert(k(1), 10)
        for _ in range(3):
            policy.on_access(k(1))
        orders[decay_every] = drain(policy)
    assert orders == {0: [k(1), k(0)], 8: [k(0), k(1)]}
    with pytest.raises(ConfigError, match="decay_every"):
        make("lfu", decay_every=-1)


def test_arc_one_time_scan_does_not_flush_frequent_keys() -> None:
    # 10 blocks of room. Five hot blocks are read twice (so ARC holds them in T2), then a scan writes 200
    # blocks that are never read again. Under ARC the hot blocks survive; under LRU the scan flushes them.
    survivors: dict[str, int] = {}
    for name in ("arc", "lru"):
        tier = SimTier(make(name), capacity=100)
        for i in range(5):
            tier.put(k(i))
        for _ in range(2):
            for i in range(5):
                tier.get(k(i))
        for i in range(1000, 1200):
            tier.put(k(i))
        survivors[name] = sum(tier.get(k(i)) for i in range(5))
    assert survivors == {"arc": 5, "lru": 0}


def test_arc_ghost_hit_adapts_target_and_promotes() -> None:
    policy = make("arc")
    assert isinstance(policy, ARCPolicy)
    fill(policy, 4)
    policy.on_access(k(3))  # k(3) -> T2
    assert policy.list_of(k(0)) == "t1" and policy.list_of(k(3)) == "t2"
    assert policy.evict(10) == [k(0)]  # T1 holds more than p (0): its LRU goes, remembered in B1
    assert policy.list_of(k(0)) == "b1" and k(0) not in policy
    policy.on_insert(k(0), 10)  # B1 ghost hit: T1 was too small
    assert policy.target_t1_bytes > 0 and policy.list_of(k(0)) == "t2"
    grown = policy.target_t1_bytes
    assert grown == 10  # one block's worth (B1 and B2 were equally long)
    # T1 = [1, 2] holds 20 > p bytes: its LRU k(1) goes; then T1 is down to p, so T2's LRU k(3) goes.
    assert policy.evict(20) == [k(1), k(3)]
    policy.on_remove(k(1))  # untracked now (a ghost): ignored
    assert policy.list_of(k(1)) == "b1" and policy.list_of(k(3)) == "b2"
    policy.on_insert(k(3), 10)  # B2 ghost hit: T2 was too small
    assert policy.target_t1_bytes < grown and policy.list_of(k(3)) == "t2"


def test_arc_ghost_lists_are_bounded() -> None:
    policy = make("arc", max_ghosts=3)
    fill(policy, 10)
    assert len(policy.evict(100)) == 10
    assert isinstance(policy, ARCPolicy)
    assert sum(policy.list_of(k(i)) == "b1" for i in range(10)) == 3


def attention(clock: FakeClock | None = None, **params: Any) -> AttentionPolicy:
    policy = make_policy(PolicyConfig(name="attention-decay", params={"clock": clock or FakeClock(), **params}))
    assert isinstance(policy, AttentionPolicy)
    return policy


def test_attention_scores_decay_with_half_life() -> None:
    clock = FakeClock()
    policy = attention(clock, half_life_s=100.0, protect_recent=0, default_score=0.0)
    fill(policy, 2)
    policy.update_scores({k(0): 8.0})
    clock.now = 300.0  # three half-lives: 8 -> 1
    assert policy.score(k(0)) == pytest.approx(1.0)
    policy.update_scores({k(1): 2.0, k(0): 0.5})  # k(0): 1 + 0.5 = 1.5 < 2
    assert policy.score(k(0)) == pytest.approx(1.5)
    assert policy.evict(1) == [k(0)]
    clock.now = 400.0
    assert policy.score(k(1)) == pytest.approx(1.0)


def test_attention_without_decay_keeps_the_higher_score() -> None:
    clock = FakeClock()
    policy = attention(clock, half_life_s=100.0, protect_recent=0, default_score=0.0)
    fill(policy, 2)
    policy.update_scores({k(0): 8.0, k(1): 2.0})
    assert policy.evict(1) == [k(1)]


def test_attention_lowest_score_per_byte_goes_first() -> None:
    policy = attention(protect_recent=0, default_score=0.0)
    policy.on_insert(k(0), 100)
    policy.on_insert(k(1), 10)
    policy.on_insert(k(2), 10)
    policy.update_scores({k(0): 10.0, k(1): 5.0, k(2): 0.5})  # per byte: 0.1, 0.5, 0.05
    assert drain(policy) == [k(2), k(0), k(1)]


def test_attention_accesses_count_without_reports() -> None:
    policy = attention(protect_recent=0)
    fill(policy, 3)
    policy.on_access(k(0))
    policy.on_access(k(0))
    policy.on_access(k(1))
    assert drain(policy) == [k(2), k(1), k(0)]


def test_attention_protects_most_recent_keys() -> None:
    policy = attention(protect_recent=2)
    fill(policy, 4)
    assert policy.evict(30) == []  # only k(0), k(1) are outside the recent window
    policy.on_access(k(0))  # now k(0) and k(3) are the two most recent
    assert sorted(policy.evict(20)) == [k(1), k(2)]
    assert policy.evict(1) == []


def test_attention_protects_sinks_unless_disabled() -> None:
    for protect_sinks, expected in ((True, [k(1), k(2)]), (False, [k(0), k(1), k(2)])):
        policy = attention(protect_recent=0, protect_sinks=protect_sinks, default_score=0.0)
        fill(policy, 3)
        policy.update_scores({k(1): 1.0, k(2): 2.0})  # the sink k(0) has the lowest score
        policy.mark_sink([k(0)])
        assert drain(policy) == expected


def test_attention_evicts_tails_before_their_prefixes() -> None:
    # Chain 0 <- 1 <- 2 (2 extends 1 extends 0) plus a lone block 9. The prefix head has the lowest score,
    # but a block is a candidate only once no child of it is held.
    policy = attention(protect_recent=0, default_score=0.0)
    for i in (0, 1, 2, 9):
        policy.on_insert(k(i), 10)
    policy.set_parent(k(1), k(0))
    policy.link(k(2), k(1))
    policy.update_scores({k(0): 1.0, k(1): 2.0, k(2): 5.0, k(9): 4.0})
    assert policy.evict(1) == [k(9)]  # the only leaves are 2 (5.0) and 9 (4.0)
    assert policy.evict(30) == [k(2), k(1), k(0)]  # one atomic call takes the whole chain, tail first


def test_attention_branching_prefix_waits_for_all_children() -> None:
    policy = attention(protect_recent=0, default_score=0.0)
    fill(policy, 3)
    policy.set_parent(k(1), k(0))
    policy.set_parent(k(2), k(0))
    policy.update_scores({k(0): 0.1, k(1): 3.0, k(2): 1.0})
    assert policy.evict(10) == [k(2)]
    policy.protect([k(1)])
    assert policy.evict(10) == []  # k(0) still has a held child (k(1)), which is protected
    policy.on_remove(k(1))
    assert policy.evict(10) == [k(0)]
    with pytest.raises(ValueError):
        policy.set_parent(k(5), k(5))


@pytest.mark.parametrize(("param", "value"), [("half_life_s", 0), ("half_life_s", "5m"),
                                              ("protect_recent", -1), ("protect_recent", 1.5),
                                              ("protect_sinks", "yes"), ("default_score", -1.0),
                                              ("default_score", float("nan")), ("clock", 3.0)])
def test_attention_rejects_bad_params_naming_them(param: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=param):
        make_policy(PolicyConfig(name="attention-decay", params={param: value}))


def _evictable(key: bytes, blocked: set[bytes], children: dict[bytes, set[bytes]]) -> bool:
    """Whether one evict call could take ``key``: it and all its held descendants are unprotected."""
    return key not in blocked and all(_evictable(c, blocked, children) for c in children[key])


@pytest.mark.parametrize("seed", range(4))
def test_attention_model_check_with_chains_sinks_and_time(seed: int) -> None:
    # Random inserts, hits, reports, links (child i extends some j < i), sinks and clock steps. After every
    # evict: victims are unprotected, each leaves no held child behind, the first is the lowest score per
    # byte among candidate leaves, and [] comes only when the evictable bytes (keys whose held descendants
    # are all evictable too) fall short.
    rng, clock = random.Random(seed), FakeClock()
    policy = attention(clock, half_life_s=50.0, protect_recent=3)
    sizes: dict[bytes, int] = {}
    parent: dict[bytes, bytes] = {}
    recent: list[bytes] = []
    sinks: set[bytes] = set()
    for _ in range(2000):
        i, op = rng.randrange(30), rng.random()
        key = k(i)
        clock.now += rng.random() * 20
        if op < 0.3 or (op < 0.5 and key in sizes):
            if key not in sizes:
                parent.pop(key, None)
                sinks.discard(key)
            if op < 0.3:
                sizes[key] = rng.randrange(1, 50)
                policy.on_insert(key, sizes[key])
            else:
                policy.on_access(key)
            recent = [r for r in recent if r != key] + [key]
        elif op < 0.6 and key in sizes and i > 0:
            parent[key] = k(rng.randrange(i))
            policy.set_parent(key, parent[key])
        elif op < 0.65 and key in sizes:
            sinks.add(key)
            policy.mark_sink([key])
        elif op < 0.8:
            policy.update_scores({k(rng.randrange(30)): rng.random() * 5})
        else:
            need = rng.randrange(1, 120)
            held = set(sizes)
            blocked = set([r for r in recent if r in held][-3:]) | (sinks & held)
            children = {p: {c for c in held if parent.get(c) == p} for p in held}
            leaves = [x for x in held if not children[x] and x not in blocked]
            victims = policy.evict(need)
            if victims:
                best = min(policy.score(x) / sizes[x] for x in leaves)
                assert sum(sizes[v] for v in victims) >= need and not set(victims) & blocked
                assert policy.score(victims[0]) / sizes[victims[0]] == pytest.approx(best)
                for v in victims:
                    del sizes[v]
                assert all(not (children[v] & set(sizes)) for v in victims)
            else:
                assert sum(sizes[x] for x in held if _evictable(x, blocked, children)) < need
        assert set(sizes) == {x for x in map(k, range(30)) if x in policy}
