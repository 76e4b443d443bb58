"""Small random-weight Llama models for tests and benchmarks, built locally.

No weights can be downloaded, so tests and benchmarks build their own model: a
``transformers`` ``LlamaForCausalLM`` with seeded random weights saved as bf16
safetensors, plus a byte-level BPE tokenizer trained with ``tokenizers`` on a
corpus generated in kvtier_bench.tokenizer. The result is a directory that
``transformers.AutoTokenizer`` and ``vllm.LLM(model=...)`` load as they are.

Builds are deterministic and cached under ``cache_dir`` (default
``$KVTIER_HOME/models``, else ``~/.cache/kvtier/models``) in a folder named by
size and :data:`MODEL_VERSION`. A build happens in a temporary folder beside
the final one and is renamed into place, so concurrent processes never see a
half-written model; a process that loses the race discards its copy.

    python -m kvtier_bench.models --size tiny        # prints the model directory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kvtier_bench.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MARKER_FILE,
    MODEL_VERSION,
    PAD_TOKEN,
    SEED,
    VOCAB_SIZE,
    default_cache_dir,
    save_tokenizer,
    write_json,
)

__all__ = ["SIZES", "ModelSpec", "build_model", "default_cache_dir", "MARKER_FILE", "model_dir_name"]

@dataclass(frozen=True)
class ModelSpec:
    """Shape of one model size; ``head_dim`` is 64 for every size."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def approx_params(self) -> int:
        """Parameter count of the Llama built from this spec (untied lm_head)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h
        per_layer = attention + mlp + norms
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * h + h


SIZES: dict[str, ModelSpec] = {
    # ~5.2M parameters
    "tiny": ModelSpec(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=768),
    # ~26M parameters
    "small": ModelSpec(num_hidden_layers=8, hidden_size=512, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=1280),
    # tiny with positions for 40k tokens: the long-context benchmark preset
    "tiny-32k": ModelSpec(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=768, max_position_embeddings=40960),
    # ~96M parameters
    "base": ModelSpec(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                      num_key_value_heads=4, intermediate_size=2560),
}


def kv_bytes_per_token(model_dir: str, dtype_bytes: int = 2) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values), from the model's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return _kv_bytes(int(cfg["num_hidden_layers"]), int(kv_heads), int(head_dim), dtype_bytes)


def kv_bytes_per_token_of(model: str, dtype_bytes: int = 2) -> int:
    """``kv_bytes_per_token`` of a size name (from its spec, nothing built) or of a model directory."""
    spec = SIZES.get(model)
    if spec is None:
        return kv_bytes_per_token(model, dtype_bytes)
    return _kv_bytes(spec.num_hidden_layers, spec.num_key_value_heads, spec.head_dim, dtype_bytes)


def _kv_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return 2 * layers * kv_heads * head_dim * dtype_bytes  # keys and values in every layer


def model_dir_name(size: str) -> str:
    return f"llama-{size}-v{MODEL_VERSION}"


def build_model(size: str = "tiny", cache_dir: str | None = None) -> str:
    """Return the directory of the ``size`` model, building it on first use.

    Raises ``ValueError`` for an unknown size. Safe to call from several
    processes at once: each either finds the finished model or builds one in a
    private temporary folder and renames it into place.
    """
    if size == "trained":  # trained on local text so its attention is not flat (kvtier_bench/train.py)
        from kvtier_bench.train import build_trained

        return build_trained(cache_dir)
    spec = _spec_for(size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / model_dir_name(size)
    if _is_complete(final):
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the model is not
        _build_into(staging, size, spec)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process renamed its build first (the target is a non-empty
            # directory); use theirs. Anything else is a real failure.
            if not _is_complete(final):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(final)


def _spec_for(size: str) -> ModelSpec:
    try:
        return SIZES[size]
    except KeyError:
        known = ", ".join(sorted(SIZES))
        raise ValueError(f"unknown model size {size!r}; choose one of: {known}") from None


def _is_complete(path: Path) -> bool:
    return (path / MARKER_FILE).is_file()


def _build_into(target: Path, size: str, spec: ModelSpec) -> None:
    """Write tokenizer, config and weights into ``target``; the marker goes last."""
    token_ids = save_tokenizer(target, spec.vocab_size, spec.max_position_embeddings)
    _save_weights(target, spec, token_ids)
    marker = {"size": size, "version": MODEL_VERSION, "seed": SEED, "spec": asdict(spec)}
    for path in target.iterdir():
        path.chmod(0o644)  # some writers create private files; the model is not
    write_json(target / MARKER_FILE, marker)


# --- weights -------------------------------------------------------------------


def _save_weights(target: Path, spec: ModelSpec, token_ids: dict[str, int]) -> None:
    """Save a seeded random LlamaForCausalLM as bf16 safetensors with its config."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        # Wider than Llama's 0.02 on purpose: at 0.02 a small random model's
        # logits are nearly flat, greedy decoding repeats one token and flips
        # on rounding noise. At 0.1 the top-1 margin is ~6x larger and the
        # output depends on the whole prompt, so wrong KV shows up as changed
        # tokens in tests.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=token_ids[BOS_TOKEN],
        eos_token_id=token_ids[EOS_TOKEN],
        pad_token_id=token_ids[PAD_TOKEN],
    )
    # Seed a forked RNG so the caller's torch random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model = model.bfloat16()
    model.save_pretrained(str(target))
    generation = GenerationConfig(
        bos_token_id=token_ids[BOS_TOKEN],
        eos_token_id=token_ids[EOS_TOKEN],
        pad_token_id=token_ids[PAD_TOKEN],
    )
    generation.save_pretrained(str(target))


# --- command line --------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvtier_bench.models",
        description="Build (or find cached) a random-weight Llama model and print its directory.",
    )
    parser.add_argument("--size", default="tiny", choices=[*sorted(SIZES), "trained"])
    parser.add_argument("--cache-dir", default=None,
                        help="where models are cached (default: $KVTIER_HOME/models or ~/.cache/kvtier/models)")
    args = parser.parse_args(argv)
    print(build_model(args.size, args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
