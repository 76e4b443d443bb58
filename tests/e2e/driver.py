"""Runs one vLLM engine (optionally with kvtier) through a multi-turn script and prints a JSON result.

Used by the e2e tests in a subprocess per engine, so every engine starts clean and processes can use
different PYTHONHASHSEEDs. Usage: python tests/e2e/driver.py SPEC_JSON  (see tests/test_connector_e2e.py)
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")


def conversation(seed: int, turns: int, system_len: int, question_len: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    system = [rng.randrange(10, 4000) for _ in range(system_len)]
    questions = [[rng.randrange(10, 4000) for _ in range(question_len)] for _ in range(turns)]
    return system, questions


def corrupt_files(directory: str) -> int:
    """Damage every stored block: flip one byte in most files, truncate every third one."""
    files = sorted(Path(directory).rglob("*.kvb"))
    for i, path in enumerate(files):
        data = bytearray(path.read_bytes())
        if i % 3 == 2:
            path.write_bytes(bytes(data[: len(data) // 2]))
        else:
            data[len(data) // 2] ^= 0x5A
            path.write_bytes(bytes(data))
    return len(files)


def gate(directory: str, name: str, timeout_s: float = 900.0) -> None:
    """Say ``ready-NAME`` and wait for the test to say ``go-NAME`` (engines that must run in a set order)."""
    Path(directory, f"ready-{name}").touch()
    deadline = time.monotonic() + timeout_s
    while not Path(directory, f"go-{name}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go-{name} within {timeout_s} s")
        time.sleep(0.05)


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kwargs: dict = {}
    if spec.get("kvtier") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_role="kv_both", kv_connector_extra_config=spec["kvtier"])
    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=4096, enforce_eager=True, seed=0,
              block_size=128, tensor_parallel_size=spec.get("tensor_parallel_size", 1), **kwargs)
    result: dict = {"startup_s": time.perf_counter() - start, "turns": []}
    sampling = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 24), ignore_eos=True)
    system, questions = conversation(spec.get("seed", 0), spec.get("turns", 4), spec.get("system_len", 300),
                                     spec.get("question_len", 100))
    history = list(system)
    for step, question in enumerate(questions):
        prompt = history + question
        if step in spec.get("gates", ()):
            gate(spec["gate_dir"], str(step))
        if spec.get("corrupt_before_turn") == step:
            result["corrupted_files"] = corrupt_files(spec["disk_dir"])
        started = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sampling, use_tqdm=False)[0]
        answer = list(out.outputs[0].token_ids)
        result["turns"].append({"prompt_len": len(prompt), "cached": out.num_cached_tokens, "output": answer,
                                "wall_s": round(time.perf_counter() - started, 4)})
        if spec.get("in_process"):  # requests vLLM still holds (blocks not freed) once generate has returned
            result["turns"][-1]["held_requests"] = len(llm.llm_engine.engine_core.engine_core.scheduler.requests)
        # Repeat the same prompt after vLLM's own prefix cache is emptied: only kvtier can serve it.
        if spec.get("repeat_after_reset"):
            time.sleep(spec.get("settle_s", 0.3))  # let async saves land
            if spec.get("reset", True):
                llm.reset_prefix_cache()
            if spec.get("prime_blocks"):  # vLLM itself holds exactly these leading blocks before the repeat
                llm.generate([TokensPrompt(prompt_token_ids=prompt[:spec["prime_blocks"] * 128 + 1])],
                             SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
            again = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sampling, use_tqdm=False)[0]
            result["turns"][-1]["repeat_cached"] = again.num_cached_tokens
            result["turns"][-1]["repeat_output"] = list(again.outputs[0].token_ids)
        history = prompt + answer
    print("E2E-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
