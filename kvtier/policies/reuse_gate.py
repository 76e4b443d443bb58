"""ReuseGate: does a block's attention score predict that it will be used again? Measured, not assumed.

The attention-aware ARC policy (attention_arc.py) lets attention reorder only the blocks ARC knows least about
(seen once, list T1), and only once this gate has measured that the scores predict reuse on the workload at
hand. A score has *components*: its mean and, for a per-layer score, each layer's value (layers disagree: which
one tracks reuse depends on the model and the workload, so the gate finds out).

- ``classify(key, values, weight, entered)``: a block's first score after it entered the tier. Per component,
  the block lies *above* or *below* the weighted mean of the last ``window`` first scores of that component.
  It is then watched for reuse (up to ``watch`` blocks). ``weight`` is the block's share of one observation:
  the blocks of one request share one score and live or die together, so together they count once.
- ``on_reference(key, now)``: the first hit or re-save of a watched block counts one reuse for its side in each
  component, and how long after entering it came. Re-saves after an eviction count too, so a side is not
  credited for having been kept longer by the policy.
- The *signal* is the component and side with the strongest evidence of a higher reuse rate than the other
  side (the two-proportion z statistic). The gate is open once that ``z >= z_open`` after at least
  ``min_reuses`` reuses. ``horizon``: ``HORIZON_MARGIN`` times the longest recent reuse distance of the
  favoured side, how long a favoured block is worth keeping (0 while the gate is shut).

Uninformative scores (noise, or scores shuffled between requests) give both sides the same reuse rate and leave
the gate shut; the policy is then plain ARC. Counts decay with a half-life of ``half_life`` classifications, so
the gate follows a workload that changes. Time is the caller's event count, never the wall clock: the same calls
give the same decisions.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence

from kvtier.keys import BlockKey

DISTANCES = 64  # reuse distances remembered per component and side
HORIZON_MARGIN = 2.0  # favoured blocks are kept for up to this many times the longest recent reuse distance


class _Component:
    """One component: the weighted mean of recent first scores, decayed counts per side (0: at or below the
    mean, 1: above) and recent reuse distances per side."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.recent: deque[tuple[float, float]] = deque()  # (value, weight), oldest first
        self.weight = 0.0
        self.weighted_sum = 0.0
        self.classified = [0.0, 0.0]
        self.reused = [0.0, 0.0]
        self.distances: tuple[deque[int], deque[int]] = (deque(maxlen=DISTANCES), deque(maxlen=DISTANCES))

    def side(self, value: float) -> int:
        return int(self.weight > 0 and value > self.weighted_sum / self.weight)

    def remember(self, value: float, weight: float) -> None:
        self.recent.append((value, weight))
        self.weight += weight
        self.weighted_sum += value * weight
        if len(self.recent) > self.window:
            old, old_weight = self.recent.popleft()
            self.weight -= old_weight
            self.weighted_sum -= old * old_weight

    def z(self, side: int) -> float:
        """Two-proportion z statistic: how far ``side``'s reuse rate lies above the other side's."""
        n, r = self.classified, self.reused
        if n[0] <= 0 or n[1] <= 0:
            return 0.0
        # a reuse counts at full weight while its classification has decayed: keep the rates within [0, 1]
        rate = [min(1.0, r[s] / n[s]) for s in (0, 1)]
        pooled = min(1.0, (r[0] + r[1]) / (n[0] + n[1]))
        spread = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n[0] + 1.0 / n[1]))
        if spread <= 0.0:
            return 0.0
        return (rate[side] - rate[1 - side]) / spread


class ReuseGate:
    def __init__(self, *, z_open: float = 3.0, min_reuses: float = 4.0, window: int = 256, watch: int = 4096,
                 half_life: int = 4096) -> None:
        self._z_open = z_open
        self._min_reuses = min_reuses
        self._window = window
        self._watch_limit = watch
        self._decay = 0.5 ** (1.0 / half_life)
        self._parts: list[_Component] = []
        # key -> (side per component, weight, when it entered), oldest first
        self._watch: OrderedDict[BlockKey, tuple[tuple[int, ...], float, int]] = OrderedDict()

    def classify(self, key: BlockKey, values: tuple[float, ...], weight: float, entered: int) -> bool:
        """Record a block's first score (its ``components``) and when it entered the tier (the caller's event
        count); True when it lands on the side the current signal favours."""
        if not self._parts:
            self._parts = [_Component(self._window) for _ in values]
        if len(values) != len(self._parts):
            values = (values[0],) * len(self._parts)  # a score of another shape: its mean stands for every part
        sides = tuple(part.side(v) for part, v in zip(self._parts, values, strict=True))
        for part, value, side in zip(self._parts, values, sides, strict=True):
            part.remember(value, weight)
            for counts in (part.classified, part.reused):
                counts[0] *= self._decay
                counts[1] *= self._decay
            part.classified[side] += weight
        self._watch.pop(key, None)
        self._watch[key] = (sides, weight, entered)
        while len(self._watch) > self._watch_limit:
            self._watch.popitem(last=False)
        index, favoured, _ = self.signal()
        return sides[index] == favoured

    def on_reference(self, key: BlockKey, now: int) -> None:
        """A hit or re-save of ``key`` at ``now``: the first one after its classification counts a reuse, and
        how long after entering it came."""
        watched = self._watch.pop(key, None)
        if watched is not None:
            sides, weight, entered = watched
            for part, side in zip(self._parts, sides, strict=True):
                part.reused[side] += weight
                part.distances[side].append(now - entered)

    def signal(self) -> tuple[int, int, float]:
        """(component, favoured side, z) of the strongest evidence that one side is reused more often."""
        best = (0, 1, 0.0)
        for index, part in enumerate(self._parts):
            for side in (1, 0):
                z = part.z(side)
                if z > best[2]:
                    best = (index, side, z)
        return best

    @property
    def is_open(self) -> bool:
        if not self._parts or sum(self._parts[0].reused) < self._min_reuses:
            return False
        return self.signal()[2] >= self._z_open

    @property
    def horizon(self) -> int:
        """While open: how long (in the caller's events) a favoured block is worth keeping; 0 while shut."""
        if not self.is_open:
            return 0
        index, side, _ = self.signal()
        distances = self._parts[index].distances[side]
        return int(HORIZON_MARGIN * max(distances)) if distances else 0

    def stats(self) -> dict[str, float]:
        """For logs and benchmarks: the signal's component, side and z, the horizon, reuses, open or not."""
        index, side, z = self.signal()
        return {"component": float(index), "side": float(side), "z": z, "horizon": float(self.horizon),
                "reuses": sum(self._parts[0].reused) if self._parts else 0.0, "open": float(self.is_open)}


def components(score: float | Sequence[float]) -> tuple[float, ...]:
    """A score's components: (value,) for a number; (mean of the finite layers, layer 0, layer 1, ...) for a
    per-layer score. Negative and non-finite values count as 0."""
    if isinstance(score, int | float):
        return (_clean(float(score)),)
    finite = [float(v) for v in score if math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else 0.0
    return (_clean(mean), *(_clean(float(v)) for v in score))


def _clean(value: float) -> float:
    return value if value > 0 and math.isfinite(value) else 0.0
