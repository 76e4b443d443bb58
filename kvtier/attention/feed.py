"""ScoreFeed: turns per-block-id attention scores from the capture into per-key policy updates.

The worker knows which kvtier key a vLLM block id holds only from what it saves and loads: (key, block id)
pairs, handed over as plain lists (the feed knows nothing of the connector's metadata types). A block id whose
offset 0 is rewritten in a forward holds new content, so its key is forgotten. At the end of each step
(``wait_for_save``) the feed maps the step's scores to keys and returns the update for the TierStack (scores,
the scheduler's sink marks and parent links). Keys saved in this very step are not stored yet (policies ignore
untracked keys), so the worker runs the update inside that step's store job, right after its put: never in a
future's done-callback, whose thread and moment depend on timing (a drained save has then also applied its
scores), and in step order whenever saves are synchronous (``connector.sync_saves``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.attention.capture import AttentionCapture
from kvtier.config import AttentionConfig

if TYPE_CHECKING:
    from kvtier.tiers.stack import TierStack

Pair = tuple[bytes, int]  # (kvtier key, vLLM block id)

log = logging.getLogger("kvtier.attention")


def uses_scores(stack: TierStack) -> bool:
    """Whether any tier's policy does something with update_scores (the base class ignores it)."""
    from kvtier.policies.base import EvictionPolicy

    return any(type(t.policy).update_scores is not EvictionPolicy.update_scores for t in stack.tiers)


class ScoreFeed:
    def __init__(self, cfg: AttentionConfig, stack: TierStack, block_size: int | None,
                 num_blocks: int | None) -> None:
        self.stack = stack
        self.capture: AttentionCapture | None = None
        self._block_keys: dict[int, bytes] = {}
        self.mode = cfg.capture
        if cfg.capture != "off" and block_size:
            self.capture = AttentionCapture(cfg.capture, cfg.window, cfg.every_n_steps, block_size, num_blocks,
                                            key_memory=cfg.key_memory, credit=cfg.credit)

    @staticmethod
    def create(cfg: AttentionConfig, stack: TierStack, block_size: int | None,
               num_blocks: int | None) -> ScoreFeed | None:
        """A feed when capture is on and some tier's policy uses scores; otherwise None (and say why)."""
        if cfg.capture == "off":
            log.info("kvtier: attention capture off")
            return None
        if not uses_scores(stack):
            log.info("kvtier: attention capture %s not installed: no tier's policy uses attention scores",
                     cfg.capture)
            return None
        return ScoreFeed(cfg, stack, block_size, num_blocks)

    def install(self, layers: Mapping[str, Any] | None, names: Sequence[str]) -> None:
        if self.capture is None or not layers:
            log.warning("kvtier: attention capture %s requested but the attention layers are not reachable; "
                        "policies rank by decayed hit counts only", self.mode)
            self.capture = None
            return
        count = self.capture.install(layers, names)
        if count == 0:
            log.warning("kvtier: no attention layer could be hooked (backend gives no access); capture off")
            self.capture = None
            return
        how = (f"SnapKV-style window of the last {self.capture.window} queries" if self.mode == "window"
               else "query-free key-norm proxy")
        log.info("kvtier: attention capture mode %s (%s) on %d layers, decode sampled every %d steps, "
                 "exact keys for up to %d live blocks", self.mode, how, count, self.capture.every_n,
                 self.capture.exact.rows if self.capture.exact is not None else 0)

    def on_loads(self, loads: Sequence[Sequence[Pair]]) -> None:
        """Blocks about to be loaded, one list of (key, block id) per request."""
        for pairs in loads:
            self._block_keys.update((b, k) for k, b in pairs)
            if self.capture is not None:
                self.capture.restore(list(pairs))

    def on_step_end(self, saves: Sequence[Pair], sinks: Sequence[bytes],
                    links: Sequence[tuple[bytes, bytes]]) -> Callable[[], None] | None:
        """The end of a step: the blocks saved in it, first blocks of sequences and prefix links (child,
        parent) among them. Returns the policy update to run once those blocks are stored (None: nothing)."""
        scores: dict[bytes, tuple[float, ...]] = {}
        if self.capture is not None:
            by_block, rewritten = self.capture.end_step()
            for block_id in rewritten:
                self._block_keys.pop(block_id, None)
            self._block_keys.update((b, k) for k, b in saves)
            self.capture.remember(list(saves))
            scores = {self._block_keys[b]: s for b, s in by_block.items() if b in self._block_keys}
        else:
            self._block_keys.update((b, k) for k, b in saves)
        sinks, links = list(sinks), list(links)
        if not (scores or sinks or links):
            return None
        return lambda: self._apply(scores, sinks, links)

    def _apply(self, scores: dict[bytes, tuple[float, ...]], sinks: list[bytes],
               links: list[tuple[bytes, bytes]]) -> None:
        try:
            if scores:
                self.stack.update_scores(scores)
            if sinks:
                self.stack.mark_sinks(sinks)
            if links:
                self.stack.set_parents(links)
        except Exception:  # a scoring problem must never fail a save
            log.exception("kvtier: applying attention scores failed")

    def counters(self) -> dict[str, float]:
        if self.capture is None:
            return {}
        return {f"attention.{k}": v for k, v in self.capture.counters.items()}
