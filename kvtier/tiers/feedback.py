"""PolicyFeedback: what the attention capture (kvtier.attention) learns about blocks, forwarded to the eviction
policy of every tier of a stack, each under its tier's lock. Policies that do not use a kind of feedback ignore
it (EvictionPolicy's defaults)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.keys import BlockKey
from kvtier.tiers.base import Tier

if TYPE_CHECKING:
    from kvtier.policies.base import Score


class PolicyFeedback:
    tiers: list[Tier]

    def update_scores(self, scores: Mapping[BlockKey, Score]) -> None:
        for tier in self.tiers:
            tier.with_policy(lambda policy: policy.update_scores(scores))

    def mark_sinks(self, keys: Sequence[BlockKey]) -> None:
        """First blocks of sequences, for policies that protect attention sinks (others ignore this)."""
        for tier in self.tiers:
            tier.with_policy(lambda policy: policy.mark_sink(keys))

    def set_parents(self, links: Sequence[tuple[BlockKey, BlockKey]]) -> None:
        """(child, parent) prefix links, for policies that evict tails first (others ignore this)."""
        def link(policy: Any) -> None:
            for child, parent in links:
                policy.set_parent(child, parent)

        for tier in self.tiers:
            tier.with_policy(link)
