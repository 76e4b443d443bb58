"""Codec benchmark on real KV: compression ratio, and encode/decode GB/s per core, per codec and setting.

KV comes from a real vLLM CPU engine (default ``--source vllm``): the locally trained model (real attention
structure, kvtier_bench.train) and a random-weight one prefill held-out text (stdlib sources the trained
model never saw), kvtier's own connector saves every full block to a disk tier without compression, and the
records are read back: the exact bytes kvtier stores (one vLLM block of every layer, bf16, vLLM's CPU layout
``[num_kv_heads, block_size, 2*head_size]`` per layer). ``--source hf`` instead runs a transformers forward
pass and arranges its KV in that layout (no vLLM needed). Capture runs in a child process, so the engine's
threads and settings never touch the measuring one.

Each setting runs the full record path (shuffle, codec, checksum, header; decode verifies everything), one
thread. Per core = raw bytes / the thread's CPU time (time.thread_time), so time the thread waits for a core
on a shared machine does not count (contention for caches and memory still does; the report records the
load average); wall-clock GB/s are in the JSON. Each rep codes every block enough
times to pass ``--rep-mib`` MiB; settings are interleaved within each rep; tables give the median over reps
and [min, max]. Each coded block is dropped before the next; the minor page faults of the timed decodes are
recorded (fresh pages cost ~2 us each on a VM, which would measure the allocator rather than the codec).

    python benchmarks/bench_codecs.py                      # trained + small, writes benchmarks/results/codecs.*
    python benchmarks/bench_codecs.py --quick --out-dir /tmp/codecs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


import numpy as np

from codecs_report import MACHINE_KEYS, machine_info, write_reports
from kvtier.codecs import ALL_DECODERS, Codec, PlanesCodec, decode_record, encode_record, make_codec
from kvtier.config import CodecConfig
from kvtier.plugins import TIERS
from kvtier_bench.procs import compute_dtype
from kvtier_bench.runner import cpu_list

GOAL_RATIO, GOAL_DECODE_GBPS = 1.4, 1.0


class Setting:
    """One codec configuration through the full record path (what a tier's BlockCodec does)."""

    def __init__(self, name: str, codec: Codec, shuffle: bool = False, cfg: CodecConfig | None = None) -> None:
        self.name, self.codec, self.shuffle, self.cfg = name, codec, shuffle, cfg
        self.decoders = {**ALL_DECODERS, codec.codec_id: codec}

    @classmethod
    def of(cls, name: str, cfg: CodecConfig) -> Setting:
        return cls(name, make_codec(cfg), cfg.shuffle, cfg)

    def encode(self, key: bytes, raw: bytes) -> bytes:
        return encode_record(key, raw, self.codec, self.shuffle)

    def decode(self, key: bytes, record: bytes, raw_size: int) -> bytes:
        return decode_record(record, key, self.decoders, raw_size)

    def default_for(self) -> str:
        """The tier kinds whose ``default_codec`` is this setting (read from the tier classes)."""
        kinds = [k for k in TIERS.names() if self.cfg == CodecConfig(TIERS.resolve(k, "kind").default_codec)]
        return f"default: {', '.join(kinds)}" if kinds else ""


def settings(sweep: bool) -> list[Setting]:
    out = [Setting.of("none", CodecConfig("none")),
           Setting.of("lz4", CodecConfig("lz4")),
           Setting.of("lz4+shuffle", CodecConfig("lz4", shuffle=True)),
           Setting.of("zstd1+shuffle", CodecConfig("zstd", 1, True)),
           Setting.of("zstd3", CodecConfig("zstd", 3)),
           Setting.of("zstd3+shuffle", CodecConfig("zstd", 3, True)),
           Setting.of("planes", CodecConfig("planes"))]
    if sweep:  # the planes codec's fixed ZSTD settings against the alternatives (the high plane's coder only)
        out += [Setting("planes zstd-1 hash_log 8", PlanesCodec(1, 8)),
                Setting("planes zstd-1 default table", PlanesCodec(1, None)),
                Setting("planes zstd-3 default table", PlanesCodec(3, None)),
                Setting("planes zstd-9 default table", PlanesCodec(9, None))]
    return out


# ---- KV capture (child process) -------------------------------------------------------------------------

def held_out_text(limit_chars: int) -> str:
    """Stdlib sources from the end of the trained model's corpus list (it trained on the first ~3M chars)."""
    from kvtier_bench.train import corpus_files

    parts: list[str] = []
    for path in reversed(corpus_files()):
        parts.append(path.read_text(errors="ignore"))
        if sum(map(len, parts)) > limit_chars:
            break
    return "".join(parts)[:limit_chars]


def prompt_ids(model_dir: str, tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = tok(held_out_text(tokens * 8), add_special_tokens=False).input_ids[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"only {len(ids)} tokens of held-out text, {tokens} asked")
    return ids


def capture_vllm(model_dir: str, ids: list[int], block_size: int, chunk: int) -> list[bytes]:
    """Blocks kvtier's connector saved from a real vLLM CPU engine (disk tier, codec none), read back."""
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVTransferConfig

    from kvtier.config import KVTierConfig
    from kvtier.tiers.factory import make_tier

    work = tempfile.mkdtemp(prefix="kvtier-codecs-")
    extra = {"tiers": [{"name": "disk", "kind": "disk", "capacity": "8GiB", "path": work, "codec": "none"}]}
    llm = LLM(model=model_dir, dtype=compute_dtype(), max_model_len=chunk + 64, enforce_eager=True, seed=0,
              block_size=block_size,
              kv_transfer_config=KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                                                  kv_connector_module_path="kvtier.connector",
                                                  kv_connector_extra_config=extra))
    prompts = [TokensPrompt(prompt_token_ids=ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    llm.generate(prompts, SamplingParams(max_tokens=1))
    llm.llm_engine.engine_core.shutdown()  # the connector finishes its saves
    del llm
    try:
        tier = make_tier(KVTierConfig.from_dict(extra).tiers[0])  # the disk tier reads its own files back
        tier.load_existing()
        blocks = [tier.codec.decode(key, tier.get(key)) for key in sorted(tier.keys())]
        tier.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return blocks


def capture_hf(model_dir: str, ids: list[int], block_size: int, chunk: int) -> list[bytes]:
    """A transformers forward pass per chunk, each block laid out as vLLM's CPU cache holds it."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    blocks = []
    for start in range(0, len(ids), chunk):
        with torch.no_grad():
            cache = model(torch.tensor([ids[start:start + chunk]]), use_cache=True).past_key_values
        # per layer [heads, 2, tokens, head_dim]: a block is, per head, block_size K rows then block_size V rows
        layers = [torch.stack([lay.keys[0], lay.values[0]], dim=1) for lay in cache.layers]
        for b in range(0, layers[0].shape[2] - block_size + 1, block_size):
            blocks.append(b"".join(t[:, :, b:b + block_size].contiguous().view(torch.uint8).numpy().tobytes()
                                   for t in layers))
    return blocks


def capture_child(spec: dict) -> None:
    from kvtier_bench.models import build_model

    model_dir = build_model(spec["model"])
    ids = prompt_ids(model_dir, spec["tokens"])
    capture = capture_vllm if spec["source"] == "vllm" else capture_hf
    blocks = capture(model_dir, ids, spec["block_size"], spec["chunk"])
    expected = sum(len(ids[i:i + spec["chunk"]]) // spec["block_size"] for i in range(0, len(ids), spec["chunk"]))
    if len(blocks) != expected or len({len(b) for b in blocks}) != 1:
        raise SystemExit(f"captured {len(blocks)} blocks of sizes {sorted({len(b) for b in blocks})}, "
                         f"expected {expected} of one size")
    np.save(spec["out"], np.frombuffer(b"".join(blocks), np.uint8).reshape(len(blocks), -1))
    meta = {"model_dir": model_dir, "blocks": len(blocks), "block_bytes": len(blocks[0]), "tokens": len(ids)}
    Path(spec["out"] + ".json").write_text(json.dumps(meta))


def capture(model: str, args: argparse.Namespace, work: str) -> tuple[list[bytes], dict]:
    out = os.path.join(work, f"{model}.npy")
    spec = {"model": model, "source": args.source, "tokens": args.tokens, "block_size": args.block_size,
            "chunk": args.chunk, "out": out}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", cpu_list()))
    proc = subprocess.run([sys.executable, __file__, "--capture-child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"KV capture for {model} failed:\n{proc.stderr[-4000:]}")
    array = np.load(out)
    meta = json.loads(Path(out + ".json").read_text())
    return [row.tobytes() for row in array], meta


# ---- measurement ---------------------------------------------------------------------------------------

def timed(fn, items: list, passes: int) -> tuple[float, float, int]:
    """(thread CPU seconds, wall seconds, minor page faults) of ``passes`` rounds of ``fn`` over ``items``."""
    import resource
    import time

    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(passes):
        for item in items:
            fn(item)
    return (time.thread_time() - cpu, time.perf_counter() - wall,
            resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults)


def zstd_threads_check(blocks: list[bytes], record_mib: int = 8) -> dict[str, float]:
    """Wall ms to compress one large record's high plane with zstd's worker threads off and on (2)."""
    import time

    import zstandard

    from kvtier.codecs.shuffle import split16

    record = b"".join(blocks)[:record_mib << 20]
    high = split16(record)[1]
    out = {"record_MiB": len(record) / 2**20}
    for threads in (0, 2):
        params = zstandard.ZstdCompressionParameters.from_level(1, hash_log=10, threads=threads)
        compressor = zstandard.ZstdCompressor(compression_params=params)
        walls = []
        for _ in range(9):
            start = time.perf_counter()
            compressor.compress(high)
            walls.append(time.perf_counter() - start)
        out[f"threads_{threads}_ms"] = float(np.median(walls)) * 1e3
    return out


def measure(blocks: list[bytes], all_settings: list[Setting], reps: int, rep_mib: int) -> dict[str, dict]:
    raw_size = len(blocks[0])
    keys = [i.to_bytes(16, "little") for i in range(len(blocks))]
    total = raw_size * len(blocks)
    passes = max(1, -(-rep_mib * 2**20 // total))
    records = {s.name: [s.encode(k, b) for k, b in zip(keys, blocks)] for s in all_settings}
    for s in all_settings:  # the benchmark measures only what round-trips
        assert all(s.decode(k, r, raw_size) == b for k, r, b in zip(keys, records[s.name], blocks)), s.name
    runs: dict[str, dict[str, list[float]]] = {s.name: {} for s in all_settings}
    for _ in range(reps):
        for s in all_settings:
            pairs = list(zip(keys, records[s.name]))
            enc = timed(lambda kb, s=s: s.encode(*kb), list(zip(keys, blocks)), passes)
            dec = timed(lambda kr, s=s: s.decode(kr[0], kr[1], raw_size), pairs, passes)
            row = runs[s.name]
            for name, value in (("encode_GBps", total * passes / enc[0]), ("decode_GBps", total * passes / dec[0]),
                                ("encode_wall_GBps", total * passes / enc[1]),
                                ("decode_wall_GBps", total * passes / dec[1]),
                                ("decode_faults_per_MiB", dec[2] / (total * passes / 2**20))):
                row.setdefault(name, []).append(value / 1e9 if name.endswith("GBps") else value)
    out = {}
    for s in all_settings:
        stored = sum(map(len, records[s.name]))
        out[s.name] = {"ratio": total / stored, "note": s.default_for(), "shuffle": s.shuffle, "codec": s.codec.name,
                       **{k: summary(v) for k, v in runs[s.name].items()}}
    return out


def summary(values: list[float]) -> dict[str, float | list[float]]:
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "runs": values}


def plane_split_gbps(blocks: list[bytes], passes: int = 20) -> dict[str, float]:
    """GB/s per core of the byte-plane shuffle and unshuffle (kvtier.codecs.shuffle) alone."""
    from kvtier.codecs.shuffle import shuffle16, unshuffle16

    shuffled = [bytes(shuffle16(b)) for b in blocks]
    total = sum(map(len, blocks)) * passes
    return {"shuffle_GBps": total / timed(shuffle16, blocks, passes)[0] / 1e9,
            "unshuffle_GBps": total / timed(unshuffle16, shuffled, passes)[0] / 1e9}


def memcpy_gbps(blocks: list[bytes], passes: int = 20) -> float:
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blocks]
    cpu = timed(lambda a: a.copy(), arrays, passes)[0]
    return sum(map(len, blocks)) * passes / cpu / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture-child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="trained,small", help="kvtier_bench.models sizes, comma-separated")
    parser.add_argument("--source", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens prefilled per model")
    parser.add_argument("--chunk", type=int, default=2048, help="tokens per prompt")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rep-mib", type=int, default=64, help="MiB coded per setting per rep")
    parser.add_argument("--no-sweep", action="store_true", help="skip the planes settings sweep")
    parser.add_argument("--quick", action="store_true", help="2048 tokens, 2 reps of 8 MiB (smoke test)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.capture_child:
        capture_child(json.loads(args.capture_child))
        return 0
    if args.quick:
        args.tokens, args.reps, args.rep_mib = 2048, 2, 8
    command = " ".join([f"nice -n {os.nice(0)}" if os.nice(0) else "", "python", *sys.argv]).strip()
    results: dict = {"command": command, "args": vars(args),
                     "machine_before": machine_info(), "goal": {"ratio": GOAL_RATIO, "decode_GBps": GOAL_DECODE_GBPS},
                     "models": {}}
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-codecs-") as work:
        for model in args.models.split(","):
            blocks, meta = capture(model, args, work)
            print(f"{model}: {meta['blocks']} blocks of {meta['block_bytes']} bytes ({args.source})", flush=True)
            rows = measure(blocks, settings(not args.no_sweep), args.reps, args.rep_mib)
            results["models"][model] = {**meta, "source": args.source, "memcpy_GBps": memcpy_gbps(blocks),
                                        "planes_split": plane_split_gbps(blocks),
                                        "zstd_threads": zstd_threads_check(blocks), "settings": rows}
    results["machine_after"] = {k: v for k, v in machine_info().items() if k in MACHINE_KEYS}
    print(write_reports(results, Path(args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
