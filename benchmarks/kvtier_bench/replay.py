"""Trace replay for eviction policies: a request sequence through a DRAM TierStack, with attention scores
recomputed by the HF model through the worker's own ``AttentionCapture`` code.

Scores: each request's post-RoPE queries and keys are recomputed with the HF model on the same weights and fed
to ``AttentionCapture`` (window mode, request credit) as one prefill step. That equals what the worker computes
while the earlier blocks' exact keys are held (``attention.key_memory``). A request's scores depend only on its
prompt, so they are computed once and replayed under every policy and capacity.

Replay mirrors the connector for one request at a time: lookup of the longest run of stored full blocks (minus
the last token), a get per hit block (an access), a put per new full block, then the scores of all the
request's blocks, sink marks and prefix links for the blocks just saved (the order ScoreFeed applies them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvtier.attention.capture import AttentionCapture
from kvtier.config import KVTierConfig
from kvtier.tiers.stack import TierStack
from kvtier_bench.families import BLOCK, Req


def qk_per_layer(model: torch.nn.Module, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE (query [T, Hq, d], key [T, Hkv, d]) of every layer, as vLLM's attention sees them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        d = module.head_dim
        q = module.q_proj(hidden).view(1, -1, module.config.num_attention_heads, d).transpose(1, 2)
        k = module.k_proj(hidden).view(1, -1, module.config.num_key_value_heads, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        captured.append((q[0].transpose(0, 1).float(), k[0].transpose(0, 1).float()))

    hooks = [layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return captured


class _Meta:
    """The attention metadata of one single-request prefill step, in block ids 1.. (as vLLM's CPU backend)."""

    def __init__(self, n: int, block_ids: list[int]) -> None:
        self.num_actual_tokens = n
        self.query_start_loc = torch.tensor([0, n])
        self.seq_lens = torch.tensor([n])
        self.block_table = torch.tensor([block_ids])
        self.slot_mapping = torch.tensor([block_ids[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])


def request_scores(model: torch.nn.Module, reqs: Sequence[Req], window: int) -> list[list[Any]]:
    """Per request, the score of each of its blocks (one value per layer), as the worker's capture computes them."""
    layers = [f"layer{i}" for i in range(len(model.model.layers))]  # type: ignore[union-attr]
    out = []
    for r in reqs:
        capture = AttentionCapture("window", window, 1, BLOCK, num_blocks=64)
        capture._order = layers
        ids = list(range(1, -(-len(r.prompt) // BLOCK) + 1))
        meta = _Meta(len(r.prompt), ids)
        for name, (q, k) in zip(layers, qk_per_layer(model, r.prompt), strict=True):
            capture.observe(name, q, k, meta, q.shape[-1] ** -0.5)
        by_block, _ = capture.end_step()
        out.append([list(by_block[b]) if b in by_block else None for b in ids])
    return out


def cached_scores(model: torch.nn.Module, model_dir: str, reqs: Sequence[Req], window: int,
                  cache_dir: str | None) -> list[list[Any]]:
    """``request_scores``, kept in ``cache_dir`` under a digest of everything they depend on: the prompts, the
    window, the model's files and the capture's source code."""
    if not cache_dir:
        return request_scores(model, reqs, window)
    import kvtier.attention as attention_pkg

    digest = hashlib.sha256(json.dumps([r.prompt for r in reqs]).encode() + str(window).encode())
    for path in sorted(Path(model_dir).glob("*.json")) + sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.read_bytes())
    for path in sorted(Path(attention_pkg.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    file = Path(cache_dir) / f"{digest.hexdigest()[:32]}.json"
    if file.exists():
        return json.loads(file.read_text())  # type: ignore[no-any-return]
    scores = request_scores(model, reqs, window)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(scores))
    return scores


def chain(prompt: list[int]) -> list[bytes]:
    """Chained keys of the prompt's full blocks (any stable chained hash serves a replay)."""
    keys, h = [], b""
    for i in range(len(prompt) // BLOCK):
        h = hashlib.blake2b(h + str(prompt[i * BLOCK:(i + 1) * BLOCK]).encode(), digest_size=16).digest()
        keys.append(h)
    return keys


def replay(policy: dict[str, Any], reqs: Sequence[Req], scores: Sequence[Sequence[Any]] | None,
           capacity_blocks: int, block_bytes: int) -> tuple[list[int], dict[str, float]]:
    """Tokens served from the tier for each request, and the policy's reuse-gate counters (if it has one).
    ``scores=None`` replays without any score reports (the no-capture control)."""
    cfg = {"tiers": [{"kind": "dram", "capacity": capacity_blocks * (block_bytes + 4096), "page_size": 4096,
                      "policy": policy}]}
    stack = TierStack.from_config(KVTierConfig.from_dict(cfg, env={}))
    raw = bytes(block_bytes)
    served = []
    for i, r in enumerate(reqs):
        keys = chain(r.prompt)
        hit = 0
        for key in keys[:(len(r.prompt) - 1) // BLOCK]:
            if stack.where(key) is None or stack.get(key) is None:
                break
            hit += 1
        served.append(hit * BLOCK)
        saved = [b for b, key in enumerate(keys) if stack.where(key) is None]
        for b in saved:
            stack.put(keys[b], raw)
        if scores is not None:
            stack.update_scores({key: s for key, s in zip(keys, scores[i], strict=False) if s is not None})
        stack.mark_sinks([keys[0]] if 0 in saved else [])
        stack.set_parents([(keys[b], keys[b - 1]) for b in saved if b > 0])
    tier_policy = stack.tiers[0].policy
    inner = getattr(tier_policy, "inner", tier_policy)
    gate = getattr(inner, "gate", None)
    return served, (gate.stats() if gate is not None else {})
