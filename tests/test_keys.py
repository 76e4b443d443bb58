"""Block keys are deterministic across processes and restarts, and namespaced by the model fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys

from kvtier.keys import KeyChain, ModelFingerprint, block_keys

FP = ModelFingerprint(model="m", dtype="bfloat16", kv_layout="cpu", block_size=4)
TOKENS = list(range(100, 118))

SCRIPT = """
from kvtier.keys import ModelFingerprint, block_keys
fp = ModelFingerprint(model="m", dtype="bfloat16", kv_layout="cpu", block_size=4)
print(",".join(k.hex() for k in block_keys(fp, list(range(100, 118)), 4, cache_salt="s")))
"""


def test_only_full_blocks_get_keys_and_chain_depends_on_prefix() -> None:
    keys = block_keys(FP, TOKENS, 4)
    assert len(keys) == 4 and len(set(keys)) == 4
    changed = block_keys(FP, [0] + TOKENS[1:], 4)
    assert all(a != b for a, b in zip(keys, changed))  # a change in block 0 changes every later key
    assert block_keys(FP, TOKENS[:8] + [7] * 8, 4)[:2] == keys[:2]


def test_namespace_and_salt_separate_key_spaces() -> None:
    other = ModelFingerprint(model="m", dtype="float16", kv_layout="cpu", block_size=4)
    assert not set(block_keys(FP, TOKENS, 4)) & set(block_keys(other, TOKENS, 4))
    assert block_keys(FP, TOKENS, 4, cache_salt="a") != block_keys(FP, TOKENS, 4, cache_salt="b")


def test_keychain_matches_batch_keys() -> None:
    chain = KeyChain(FP, 4)
    chain.extend(TOKENS[:9])
    assert chain.extend(TOKENS) == block_keys(FP, TOKENS, 4)


def test_same_keys_in_processes_with_different_hash_seeds() -> None:
    outputs = set()
    for seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        outputs.add(out.stdout.strip())
    assert len(outputs) == 1
    assert outputs.pop() == ",".join(k.hex() for k in block_keys(FP, TOKENS, 4, cache_salt="s"))


def test_the_fingerprint_follows_every_setting_that_changes_kv() -> None:
    # Real vLLM configs of the locally built model: the same settings give the same fingerprint in any
    # process; RoPE overrides and the KV-cache dtype give another (their KV differs for the same tokens).
    from vllm.engine.arg_utils import EngineArgs

    from kvtier.connector.fingerprint import fingerprint_from_vllm
    from kvtier_bench.models import build_model

    model = build_model("tiny")

    def digest(**kwargs: object) -> bytes:
        cfg = EngineArgs(model=model, dtype="bfloat16", max_model_len=1024, enforce_eager=True,
                         **kwargs).create_engine_config()  # type: ignore[arg-type]
        return fingerprint_from_vllm(cfg, None).digest()

    plain = digest()
    assert digest() == plain
    assert digest(hf_overrides={"rope_theta": 5000.0}) != plain
    assert digest(kv_cache_dtype="fp8") != plain
