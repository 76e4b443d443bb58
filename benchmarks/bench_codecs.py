"""Codec benchmark on real KV: compression ratio and encode/decode MB/s per codec.

KV tensors are captured from a real forward pass (transformers, the locally built Llama from kvtier_bench.models;
pass --model for any local model directory) over real text (Python's own source files on this machine),
cut into vLLM-sized blocks (block_size tokens x all layers x K and V) exactly as kvtier stores them.
Each codec runs through the full record path (shuffle, compress, checksum, header; decode verifies).
Random bytes are reported as a reference row. Usage: python benchmarks/bench_codecs.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvtier.codecs import BlockCodec
from kvtier.config import CodecConfig

CODECS = {
    "none": CodecConfig("none"),
    "lz4": CodecConfig("lz4"),
    "lz4+shuffle": CodecConfig("lz4", shuffle=True),
    "zstd1+shuffle": CodecConfig("zstd", 1, True),
    "zstd3": CodecConfig("zstd", 3),
    "zstd3+shuffle": CodecConfig("zstd", 3, True),
    "zstd9+shuffle": CodecConfig("zstd", 9, True),
}


def local_text(limit_chars: int) -> str:
    root = Path(sys.modules["json"].__file__).resolve().parents[1]  # the stdlib directory
    parts: list[str] = []
    for path in sorted(root.glob("*.py")):
        parts.append(path.read_text(errors="ignore"))
        if sum(map(len, parts)) > limit_chars:
            break
    return "".join(parts)[:limit_chars]


def capture_kv_blocks(model_dir: str, tokens: int, block_size: int) -> list[bytes]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).eval()
    ids = tok(local_text(tokens * 8), return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    layers = []
    for layer in range(len(cache.layers) if hasattr(cache, "layers") else len(cache)):
        k, v = (cache.layers[layer].keys, cache.layers[layer].values) if hasattr(cache, "layers") else cache[layer]
        layers.append(torch.stack([k[0], v[0]]))  # [2, heads, tokens, head_dim]
    blocks = []
    for start in range(0, ids.shape[1] - block_size + 1, block_size):
        per_layer = [t[:, :, start:start + block_size].contiguous().view(torch.uint8).numpy().tobytes() for t in layers]
        blocks.append(b"".join(per_layer))
    return blocks


def measure(blocks: list[bytes], cfg: CodecConfig, repeat: int) -> dict[str, float]:
    codec = BlockCodec(cfg)
    keys = [i.to_bytes(16, "little") for i in range(len(blocks))]
    raw_bytes = sum(map(len, blocks)) * repeat
    start = time.perf_counter()
    for _ in range(repeat):
        records = [codec.encode(k, b) for k, b in zip(keys, blocks)]
    enc = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeat):
        for k, r in zip(keys, records):
            codec.decode(k, r)
    dec = time.perf_counter() - start
    stored = sum(map(len, records))
    return {"ratio": sum(map(len, blocks)) / stored, "encode_MBps": raw_bytes / enc / 1e6,
            "decode_MBps": raw_bytes / dec / 1e6}


def memcpy_mbps(blocks: list[bytes], repeat: int) -> float:
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blocks]
    start = time.perf_counter()
    for _ in range(repeat):
        for a in arrays:
            a.copy()
    return sum(map(len, blocks)) * repeat / (time.perf_counter() - start) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model dir (default: kvtier_bench.models 'small')")
    parser.add_argument("--size", default="small", help="kvtier_bench.models size when --model is not given")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/bench_codecs.json")
    args = parser.parse_args()
    if args.model is None:
        from kvtier_bench.models import build_model

        args.model = build_model(args.size)
    tokens = 512 if args.quick else args.tokens
    repeat = 1 if args.quick else 3
    blocks = capture_kv_blocks(args.model, tokens, args.block_size)
    noise = [np.random.default_rng(0).integers(0, 256, len(blocks[0]), dtype=np.uint8).tobytes()] * len(blocks)
    results: dict[str, object] = {"model": args.model, "blocks": len(blocks), "block_bytes": len(blocks[0]),
                                  "memcpy_MBps": memcpy_mbps(blocks, repeat * 5), "real_kv": {}, "random": {}}
    print(f"{len(blocks)} blocks of {len(blocks[0])} bytes of real KV from {args.model}; "
          f"memcpy {results['memcpy_MBps']:.0f} MB/s")
    print(f"{'codec':16} {'ratio':>7} {'enc MB/s':>9} {'dec MB/s':>9} | {'random ratio':>12}")
    for name, cfg in CODECS.items():
        real = measure(blocks, cfg, repeat)
        rand = measure(noise, cfg, 1)
        results["real_kv"][name] = real  # type: ignore[index]
        results["random"][name] = rand  # type: ignore[index]
        print(f"{name:16} {real['ratio']:7.3f} {real['encode_MBps']:9.0f} {real['decode_MBps']:9.0f} | "
              f"{rand['ratio']:12.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
