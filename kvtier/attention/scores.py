"""Pure functions for attention-score capture: how much attention each KV block of one request receives.

SnapKV-style observation: the last ``w`` query positions of a request (its *window*) attend over the
request's keys; the softmax probabilities ``softmax(q·K^T * scale)`` are summed over query heads and window
positions and then over the tokens of each block. Keys come from two sources:

- *exact* keys: those computed in this step (seen in the attention layer's forward inputs) and those of
  earlier blocks the capture still holds, causal-masked against the window positions;
- *block summaries* for earlier positions (computed in earlier steps, or loaded): per block, the count ``n``,
  mean ``mu`` and per-dimension variance ``var`` of its keys. Under a Gaussian model of the block's keys the
  block's total unnormalised attention for a query ``q`` is ``n * exp(s*q·mu + s^2/2 * sum_i q_i^2 var_i)``
  (``s`` = scale). The variance term is capped (``var_cap``) because heavy-tailed keys make it blow up.
  A block with ``n == 0`` is *unknown*: it takes no part in the softmax and gets no score.

GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``. Tensors are float32; shapes are documented per
function. No vLLM import: these run on any torch device and are tested against a direct softmax.
"""

from __future__ import annotations

import torch

__all__ = [
    "BlockStats",
    "decode_block_mass",
    "direct_block_mass",
    "proxy_block_scores",
    "relative_scores",
    "stats_from_keys",
    "window_block_mass",
]

# Cap on the Gaussian variance term (in natural-log units: at most e^4 = 55x the mean-key estimate).
VAR_CAP = 4.0


class BlockStats:
    """Summaries of ``J`` blocks: ``count [J]``, ``mean [J, Hkv, d]``, ``var [J, Hkv, d]`` (float32)."""

    __slots__ = ("count", "mean", "var")

    def __init__(self, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.count, self.mean, self.var = count, mean, var

    @staticmethod
    def empty(num_kv_heads: int, head_dim: int, device: torch.device | str = "cpu") -> BlockStats:
        return BlockStats(torch.zeros(0, device=device), torch.zeros(0, num_kv_heads, head_dim, device=device),
                          torch.zeros(0, num_kv_heads, head_dim, device=device))

    def __len__(self) -> int:
        return int(self.count.shape[0])


def stats_from_keys(keys: torch.Tensor, block_size: int) -> BlockStats:
    """Summaries of consecutive blocks of ``keys [n, Hkv, d]`` (positions 0..n-1; the last block may be partial)."""
    n, hkv, d = keys.shape
    nb = -(-n // block_size)
    pad = nb * block_size - n
    k = torch.cat([keys.float(), keys.new_zeros(pad, hkv, d, dtype=torch.float32)]) if pad else keys.float()
    k = k.view(nb, block_size, hkv, d)
    count = torch.full((nb,), float(block_size), device=keys.device)
    if pad:
        count[-1] = block_size - pad
    mean = k.sum(1) / count[:, None, None]
    sq = (k * k).sum(1) / count[:, None, None]
    return BlockStats(count, mean, (sq - mean * mean).clamp_min(0.0))


def _expand_kv(x: torch.Tensor, num_heads: int, head_axis: int) -> torch.Tensor:
    """Repeat KV heads along ``head_axis`` so head ``h`` reads KV head ``h // group``."""
    group = num_heads // x.shape[head_axis]
    return x.repeat_interleave(group, dim=head_axis) if group > 1 else x


def window_block_mass(q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor | int,
                      prior: BlockStats, block_size: int, scale: float,
                      var_cap: float = VAR_CAP) -> torch.Tensor:
    """Attention mass per block of one request, summed over query heads and window positions.

    ``q [w, Hq, d]`` at absolute positions ``q_pos [w]``; exact ``keys [n, Hkv, d]`` at absolute positions
    ``key_pos [n]`` (any order; an int ``p`` means ``p .. p+n-1``); ``prior`` summarises blocks ``0 ..
    len(prior)-1`` whose keys are not among ``keys`` (``count`` 0 for a block that is unknown or given
    exactly). Returns ``[nb]``, ``nb`` covering both; it sums to ``Hq * w`` unless every key is unknown.
    """
    hq = q.shape[1]
    n = keys.shape[0]
    q32 = q.float()
    if isinstance(key_pos, int):
        key_pos = torch.arange(key_pos, key_pos + n, device=q.device)
    j = len(prior)
    nb = max(j, (int(key_pos.max()) // block_size + 1) if n else 0)
    parts: list[torch.Tensor] = []
    if j:
        mu = _expand_kv(prior.mean, hq, 1)  # [J, Hq, d]
        var = _expand_kv(prior.var, hq, 1)
        lin = torch.einsum("whd,jhd->hwj", q32, mu) * scale
        quad = (torch.einsum("whd,jhd->hwj", q32 * q32, var) * (0.5 * scale * scale)).clamp(max=var_cap)
        parts.append(lin + quad + _log_count(prior.count)[None, None, :])
    if n:
        k = _expand_kv(keys.float(), hq, 1)  # [n, Hq, d]
        logits = torch.einsum("whd,nhd->hwn", q32, k) * scale
        parts.append(logits.masked_fill(key_pos[None, None, :] > q_pos[None, :, None], float("-inf")))
    out = torch.zeros(nb, device=q.device)
    if not parts:
        return out
    logits = torch.cat(parts, dim=2)  # [Hq, w, J + n]
    lse = torch.logsumexp(logits, dim=2, keepdim=True)
    probs = torch.where(torch.isfinite(lse), (logits - lse).exp(), torch.zeros_like(logits)).sum(dim=(0, 1))
    if j:
        out[:j] += probs[:j]
    if n:
        out.index_add_(0, key_pos // block_size, probs[j:])
    return out


def _log_count(count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, count.clamp_min(1e-30).log(), torch.full_like(count, float("-inf")))


def decode_block_mass(q: torch.Tensor, cur_key: torch.Tensor, cur_block: torch.Tensor, exact_keys: torch.Tensor,
                      exact_at: tuple[torch.Tensor, torch.Tensor], exact_valid: torch.Tensor, prior: BlockStats,
                      scale: float, var_cap: float = VAR_CAP) -> torch.Tensor:
    """``window_block_mass`` for a batch of ``R`` requests with one query each (a decode step), in one pass.

    ``q [R, Hq, d]``; the key computed this step ``cur_key [R, Hkv, d]`` lies in block ``cur_block [R]``;
    ``exact_keys [M, bs, Hkv, d]`` are held keys of earlier blocks at (request, block) ``exact_at`` with
    ``exact_valid [M, bs]`` marking filled positions; ``prior`` summarises earlier blocks per request, shaped
    ``count [R, J]``, ``mean``/``var [R, J, Hkv, d]`` (``count`` 0 where a block is unknown or held exactly).
    Every earlier key precedes the query, so nothing is causally masked. Returns ``[R, J]`` (``J`` covers
    ``cur_block``); each row sums to ``Hq`` unless all its keys are unknown.
    """
    r, hq, _ = q.shape
    j, bs = prior.count.shape[1], exact_keys.shape[1]
    q32 = q.float()
    neg = float("-inf")
    held = torch.full((r, hq, j, bs), neg, device=q.device)
    if exact_keys.shape[0]:
        rows, blocks = exact_at
        k = _expand_kv(exact_keys.float(), hq, 2)  # [M, bs, Hq, d]
        logits = torch.einsum("mhd,mthd->mht", q32[rows], k) * scale
        held[rows, :, blocks] = logits.masked_fill(~exact_valid[:, None, :], neg)
    mu, var = _expand_kv(prior.mean, hq, 2), _expand_kv(prior.var, hq, 2)  # [R, J, Hq, d]
    summary = (torch.einsum("rhd,rjhd->rhj", q32, mu) * scale
               + (torch.einsum("rhd,rjhd->rhj", q32 * q32, var) * (0.5 * scale * scale)).clamp(max=var_cap)
               + _log_count(prior.count)[:, None, :])
    current = (q32 * _expand_kv(cur_key.float(), hq, 1)).sum(-1, keepdim=True) * scale  # [R, Hq, 1]
    logits = torch.cat([held.view(r, hq, j * bs), summary, current], dim=2)
    lse = torch.logsumexp(logits, dim=2, keepdim=True)
    probs = torch.where(torch.isfinite(lse), (logits - lse).exp(), torch.zeros_like(logits)).sum(1)  # [R, .]
    mass = probs[:, :j * bs].view(r, j, bs).sum(2) + probs[:, j * bs:j * bs + j]
    mass.scatter_add_(1, cur_block.view(r, 1), probs[:, -1:])
    return mass


def direct_block_mass(q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, block_size: int,
                      scale: float) -> torch.Tensor:
    """Reference: the same mass from every key ``keys [n, Hkv, d]`` (positions 0..n-1), by a plain softmax."""
    w, hq, _ = q.shape
    n = keys.shape[0]
    out = torch.zeros(-(-n // block_size), dtype=torch.float64)
    group = hq // keys.shape[1]
    for h in range(hq):
        for i in range(w):
            visible = int(q_pos[i]) + 1
            logits = (keys[:visible, h // group].double() @ q[i, h].double()) * scale
            probs = torch.softmax(logits, dim=0)
            for t in range(visible):
                out[t // block_size] += probs[t]
    return out


def relative_scores(mass: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mass as a multiple of a uniform share over the ``known`` blocks (1.0 = an average block), 0 elsewhere."""
    total = mass[known].sum()
    count = int(known.sum())
    if count == 0 or float(total) <= 0:
        return torch.zeros_like(mass)
    return torch.where(known, mass * (count / total), torch.zeros_like(mass))


def proxy_block_scores(inv_norm_mean: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Query-free proxy from ``inv_norm_mean [nb]`` (mean of 1/||k|| over a block's tokens, heads, layers).

    Keys with a small L2 norm tend to receive more attention (Devoto et al., 2024, "A Simple and Effective
    L2 Norm-Based Strategy for KV Cache Compression"), so blocks are ranked by mean inverse key norm,
    relative to the request's average known block (1.0 = average).
    """
    return relative_scores(inv_norm_mean.clamp_min(0.0), known)
