"""The ``attention`` policy: ARC that lets attention scores reorder the blocks it knows least about, once they
have been shown to predict reuse on the running workload.

ARC (see arc.py) keeps blocks seen once in T1 and blocks seen again in T2, remembers evicted keys as ghosts
(B1, B2) and adapts the byte target ``p`` of T1 from ghost hits; it evicts from T1 while T1 holds more than
``p``, else from T2, least recently used first. This policy keeps all of that and changes two things:

- *Attention inside T1.* A block's first attention score after it enters the tier (``update_scores``) files
  it on the favoured or the other side of T1 (reuse_gate.py: the score component and side whose blocks have
  been reused more often, measured on this workload). While the gate is open, T1 gives up its other side
  first and keeps a favoured block until it is older than the gate's horizon (twice the longest recent reuse
  distance of favoured blocks), each side least recently used first. While the gate is shut, T1 is one LRU
  list as in ARC, so uninformative scores cost only the bookkeeping. T2, the ghosts and ``p`` never look at
  scores.
- *Tails first.* A hit needs the whole prefix, so a block never leaves while a block extending it
  (``set_parent``) stays. In T1 only blocks without held children are candidates. A T2 block is a candidate
  when none of its children is in T2; taking it takes its T1 descendants first (new tails of a hot prefix,
  worth less than it by ARC's own measure), so an old T2 chain never shelters behind a fresh T1 tail. One
  ``evict`` call may take a whole chain, tail first. This subsumes attention-sink protection: the first block
  of a sequence stays while any continuation of it does (``mark_sink`` is accepted and ignored).

Also never returned by ``evict``: keys protected through the base API and the ``protect_recent`` most recently
inserted or accessed keys (default 0: ARC's recency order already keeps them longest). Time counts events, never
the wall clock, so the same calls always give the same victims. Candidates live in three heaps (T1 other side,
T1 favoured side, T2) keyed by the tick of their last insert or access, with lazy deletion.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy, Score
from kvtier.policies.reuse_gate import ReuseGate, components

T1_LOW, T1_HIGH, T2 = 0, 1, 2  # T1's other side, T1's favoured side, T2
_Entry = tuple[int, BlockKey]  # (tick of the last insert/access, key): the lowest tick goes first
_MIN_GHOSTS = 64


@dataclass
class _Plan:
    """One ``evict`` call's working state; nothing in the policy changes until the victims are final."""

    recent: set[BlockKey]
    horizon: int  # while > 0, T1's favoured blocks younger than this go after the other side's
    chosen: list[BlockKey] = field(default_factory=list)
    chosen_set: set[BlockKey] = field(default_factory=set)
    popped: list[tuple[int, _Entry]] = field(default_factory=list)  # (list, entry) taken off a heap
    exposed: tuple[list[_Entry], ...] = field(default_factory=lambda: ([], [], []))  # parents freed by victims
    left: dict[BlockKey, int] = field(default_factory=dict)  # parent -> blocking children not yet chosen


class AttentionARCPolicy(EvictionPolicy):
    """ARC + tail-first prefixes + attention-ordered T1 behind a measured reuse gate (see the module docstring)."""

    name = "attention"

    def __init__(self, *, max_ghosts: int | None = None, protect_recent: int = 0, gate_z: float = 3.0,
                 gate_min_reuses: float = 4.0, **params: Any) -> None:
        super().__init__(**params)
        _check_int("max_ghosts", max_ghosts, allow_none=True)
        _check_int("protect_recent", protect_recent)
        for name, value in (("gate_z", gate_z), ("gate_min_reuses", gate_min_reuses)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        self._max_ghosts = max_ghosts
        self._protect_recent = protect_recent
        self.gate = ReuseGate(z_open=float(gate_z), min_reuses=float(gate_min_reuses))
        self._size: dict[BlockKey, int] = {}
        self._where: dict[BlockKey, int] = {}  # key -> T1_LOW, T1_HIGH or T2
        self._tick: dict[BlockKey, int] = {}
        self._bytes = [0, 0, 0]  # per list
        self._heaps: tuple[list[_Entry], ...] = ([], [], [])  # candidates per list
        self._entries: dict[BlockKey, _Entry] = {}  # the current heap entry of each candidate
        self._parked: set[BlockKey] = set()  # protected candidates taken off their heap by evict
        self._recent: OrderedDict[BlockKey, None] = OrderedDict()  # least recently touched first
        self._parent: dict[BlockKey, BlockKey] = {}  # tracked child -> parent (tracked or not)
        self._children: dict[BlockKey, set[BlockKey]] = {}  # parent -> its tracked children
        self._t2_children: Counter[BlockKey] = Counter()  # parent -> how many of its children are in T2
        self._b1: OrderedDict[BlockKey, None] = OrderedDict()
        self._b2: OrderedDict[BlockKey, None] = OrderedDict()
        self._p = 0.0
        self._unscored: set[BlockKey] = set()  # entered the tier, first score not yet reported
        self._clock = 0

    # ---- introspection (tests, benchmarks, `kvtier inspect`) ---------------------------------------
    @property
    def target_t1_bytes(self) -> float:
        return self._p

    def list_of(self, key: BlockKey) -> str | None:
        """'t1-low', 't1-high' (T1's favoured side), 't2', 'b1', 'b2' or None."""
        if key in self._where:
            return ("t1-low", "t1-high", "t2")[self._where[key]]
        return "b1" if key in self._b1 else "b2" if key in self._b2 else None

    # ---- tracking ----------------------------------------------------------------------------------
    def on_insert(self, key: BlockKey, size: int) -> None:
        self.gate.on_reference(key, self._clock)
        if key in self._size:
            self._bytes[self._where[key]] += size - self._size[key]
            self._size[key] = size
            self._place(key, T2)  # a re-insert counts as an access
            self._trim_ghosts()
            return
        stream = T1_LOW
        if key in self._b1:
            del self._b1[key]
            self._adapt(grow=True, size=size)
            stream = T2
        elif key in self._b2:
            del self._b2[key]
            self._adapt(grow=False, size=size)
            stream = T2
        self._size[key] = size
        self._unscored.add(key)
        self._place(key, stream)
        self._trim_ghosts()

    def on_access(self, key: BlockKey) -> None:
        if key in self._size:
            self.gate.on_reference(key, self._clock)
            self._place(key, T2)

    def on_remove(self, key: BlockKey) -> None:
        if key in self._size:
            self._forget(key)  # an explicit removal is not an eviction: no ghost is kept

    def update_scores(self, scores: Mapping[BlockKey, Score]) -> None:
        """File blocks by their first score since they entered; later scores of a block are ignored. Blocks
        reported with the same score in one call (one request's blocks) count as one observation."""
        fresh = [(key, components(score)) for key, score in scores.items() if key in self._unscored]
        shared = Counter(values for _, values in fresh)
        for key, values in fresh:
            self._unscored.discard(key)
            favoured = self.gate.classify(key, values, 1.0 / shared[values], self._tick[key])
            if self._where[key] != T2:
                self._restream(key, T1_HIGH if favoured else T1_LOW)

    def set_parent(self, key: BlockKey, parent: BlockKey) -> None:
        """Record that tracked ``key`` extends ``parent``'s prefix; ``parent`` then waits for ``key``."""
        if key == parent:
            raise ValueError("set_parent: a block cannot be its own parent")
        if key not in self._size or self._parent.get(key) == parent:
            return
        self._unlink(key)
        self._parent[key] = parent
        self._children.setdefault(parent, set()).add(key)
        if self._where[key] == T2:
            self._t2_children[parent] += 1
        self._refresh(parent)

    def unprotect(self, keys: Iterable[BlockKey]) -> None:
        keys = list(keys)
        super().unprotect(keys)
        for key in keys:
            if key in self._parked and not self.is_protected(key):
                self._parked.discard(key)
                if key in self._entries:
                    heapq.heappush(self._heaps[self._where[key]], self._entries[key])

    # ---- eviction ----------------------------------------------------------------------------------
    def evict(self, nbytes: int) -> list[BlockKey]:
        if nbytes <= 0:
            return []
        plan = _Plan(set(islice(reversed(self._recent), self._protect_recent)), self.gate.horizon)
        t1_left = self._bytes[T1_LOW] + self._bytes[T1_HIGH]
        p = min(self._p, t1_left + self._bytes[T2])
        freed = 0
        while freed < nbytes:
            order = ((T1_LOW, T1_HIGH), (T2,)) if t1_left > p else ((T2,), (T1_LOW, T1_HIGH))
            taken = self._take(plan, order[0]) or self._take(plan, order[1])
            if not taken:
                self._restore(plan, evicted=set())
                return []  # not enough evictable bytes: nothing was changed
            for key in taken:
                plan.chosen.append(key)
                plan.chosen_set.add(key)
                freed += self._size[key]
                if self._where[key] != T2:
                    t1_left -= self._size[key]
            self._expose_parent(plan, taken[-1])
        self._restore(plan, evicted=plan.chosen_set)
        for key in plan.chosen:
            (self._b2 if self._where[key] == T2 else self._b1)[key] = None
            self._forget(key)
        self._trim_ghosts()
        return plan.chosen

    def __contains__(self, key: object) -> bool:
        return key in self._size

    def __len__(self) -> int:
        return len(self._size)

    # ---- candidates --------------------------------------------------------------------------------
    def _take(self, plan: _Plan, lists: tuple[int, ...]) -> list[BlockKey]:
        """The next victim of ``lists`` with the T1 descendants that must go before it, tail first; [] if
        none."""
        while True:
            found = [(entry, lst, from_heap) for lst in lists
                     for entry, from_heap in [self._peek(plan, lst)] if entry is not None]
            if not found:
                return []
            entry, lst, from_heap = self._pick(found, plan.horizon)
            if from_heap:
                heapq.heappop(self._heaps[lst])
                plan.popped.append((lst, entry))
            else:
                heapq.heappop(plan.exposed[lst])
            tail = self._tail(plan, entry[1]) if lst == T2 else []
            if tail is not None:
                return [*tail, entry[1]]
            # a T1 descendant is protected or recent: this block cannot go in this call

    def _pick(self, found: list[tuple[_Entry, int, bool]], horizon: int) -> tuple[_Entry, int, bool]:
        """The least recently touched of the lists' oldest candidates; but while the gate is open (``horizon``
        > 0) T1's favoured side yields to the other side unless its oldest block is past the horizon."""
        if horizon > 0 and len(found) == 2 and found[1][1] == T1_HIGH:
            low, high = found
            return high if self._clock - high[0][0] > horizon else low
        return min(found, key=lambda f: f[0])

    def _peek(self, plan: _Plan, lst: int) -> tuple[_Entry | None, bool]:
        """The oldest candidate of ``lst`` in this call (from its heap, or a parent exposed by a victim)."""
        heap = self._heaps[lst]
        while heap:
            entry = heap[0]
            key = entry[1]
            if self._entries.get(key) is not entry or key in plan.chosen_set:
                heapq.heappop(heap)  # stale
            elif self.is_protected(key):
                heapq.heappop(heap)
                self._parked.add(key)  # back on the heap when unprotected: nothing observable changes
            elif key in plan.recent:
                plan.popped.append((lst, heapq.heappop(heap)))
            else:
                break
        exposed = plan.exposed[lst]
        while exposed and (exposed[0][1] in plan.recent or self.is_protected(exposed[0][1])):
            heapq.heappop(exposed)  # not a candidate in this call; a leaf again once its children are gone
        top = heap[0] if heap else None
        if exposed and (top is None or exposed[0] < top):
            return exposed[0], False
        return top, True

    def _tail(self, plan: _Plan, key: BlockKey) -> list[BlockKey] | None:
        """``key``'s held descendants not chosen yet, children after their own children; None when one of
        them is protected or recent."""
        out: list[BlockKey] = []
        stack = [(child, False) for child in self._children.get(key, ())]
        while stack:
            node, expanded = stack.pop()
            if node in plan.chosen_set or node not in self._size:
                continue
            if expanded:
                out.append(node)
                continue
            if self.is_protected(node) or node in plan.recent:
                return None
            stack.append((node, True))
            stack.extend((child, False) for child in self._children.get(node, ()))
        return out

    def _expose_parent(self, plan: _Plan, key: BlockKey) -> None:
        """``key`` was chosen: its parent becomes a candidate of this call once nothing blocks it."""
        parent = self._parent.get(key)
        if parent is None or parent not in self._size:
            return
        parent_in_t2 = self._where[parent] == T2
        if parent_in_t2 and self._where[key] != T2:
            return  # T1 children never block a T2 parent
        if parent not in plan.left:
            plan.left[parent] = self._t2_children[parent] if parent_in_t2 else len(self._children[parent])
        plan.left[parent] -= 1
        if plan.left[parent] == 0:
            heapq.heappush(plan.exposed[self._where[parent]], (self._tick[parent], parent))

    def _restore(self, plan: _Plan, evicted: set[BlockKey]) -> None:
        """Put back the heap entries this call took off but does not evict."""
        for lst, entry in plan.popped:
            if entry[1] not in evicted:
                heapq.heappush(self._heaps[lst], entry)

    # ---- bookkeeping -------------------------------------------------------------------------------
    def _place(self, key: BlockKey, lst: int) -> None:
        """Move ``key`` to ``lst`` as its most recently touched key."""
        old = self._where.get(key)
        if old is not None:
            self._bytes[old] -= self._size[key]
        self._where[key] = lst
        self._bytes[lst] += self._size[key]
        self._clock += 1
        self._tick[key] = self._clock
        self._recent[key] = None
        self._recent.move_to_end(key)
        parent = self._parent.get(key)
        if parent is not None and lst == T2 and old != T2:
            self._t2_children[parent] += 1
            self._refresh(parent)
        self._refresh(key)

    def _restream(self, key: BlockKey, lst: int) -> None:
        """Move ``key`` to the other side of T1, keeping its recency."""
        if self._where[key] != lst:
            self._bytes[self._where[key]] -= self._size[key]
            self._where[key] = lst
            self._bytes[lst] += self._size[key]
            self._refresh(key)

    def _is_candidate(self, key: BlockKey) -> bool:
        if self._where[key] == T2:
            return self._t2_children[key] == 0
        return not self._children.get(key)

    def _refresh(self, key: BlockKey) -> None:
        """(Re)file ``key`` as a candidate while it is tracked and nothing blocks it; otherwise drop its entry."""
        self._parked.discard(key)
        if key not in self._size or not self._is_candidate(key):
            self._entries.pop(key, None)
            return
        entry = (self._tick[key], key)
        self._entries[key] = entry
        heapq.heappush(self._heaps[self._where[key]], entry)
        if sum(len(h) for h in self._heaps) > 2 * len(self._entries) + 64:
            self._parked.clear()  # protected entries go back too; evict parks them again when met
            self._heaps = ([], [], [])
            for k, e in self._entries.items():
                self._heaps[self._where[k]].append(e)
            for heap in self._heaps:
                heapq.heapify(heap)

    def _unlink(self, key: BlockKey) -> None:
        parent = self._parent.pop(key, None)
        if parent is None:
            return
        siblings = self._children[parent]
        siblings.discard(key)
        if not siblings:
            del self._children[parent]
        if self._where.get(key) == T2:
            self._t2_children[parent] -= 1
            if self._t2_children[parent] <= 0:
                del self._t2_children[parent]
        self._refresh(parent)

    def _forget(self, key: BlockKey) -> None:
        self._unlink(key)
        self._bytes[self._where.pop(key)] -= self._size.pop(key)
        del self._tick[key]
        del self._recent[key]
        self._entries.pop(key, None)
        self._parked.discard(key)
        self._unscored.discard(key)

    def _adapt(self, grow: bool, size: int) -> None:
        """A ghost hit moves ``p`` by one block, scaled up when the other ghost list is the longer one."""
        b1, b2 = len(self._b1) + (1 if grow else 0), len(self._b2) + (0 if grow else 1)
        ratio = max(1.0, b2 / b1) if grow else max(1.0, b1 / b2)
        delta = ratio * max(size, 1)
        limit = float(sum(self._bytes) + size)
        self._p = min(self._p + delta, limit) if grow else max(self._p - delta, 0.0)

    def _trim_ghosts(self) -> None:
        limit = self._max_ghosts if self._max_ghosts is not None else max(len(self._size), _MIN_GHOSTS)
        for ghosts in (self._b1, self._b2):
            while len(ghosts) > limit:
                ghosts.popitem(last=False)


def _check_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an integer >= 0{' or null (auto)' if allow_none else ''}, "
                         f"got {value!r}")
