"""One engine with LoRA enabled (optionally with kvtier) runs the same prompt under two adapters and without
one, emptying vLLM's prefix cache between requests, and prints what each request computed and reused.

Usage: python tests/e2e/lora_driver.py SPEC_JSON  (see tests/test_lora_e2e.py)
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


def make_adapter(target: Path, model_dir: str, seed: int, rank: int = 8) -> str:
    """A random LoRA adapter on q_proj and v_proj of every layer, large enough to change the KV and tokens."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    out = {"q_proj": config["num_attention_heads"] * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj, width in out.items():
            base = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.2
            tensors[f"{base}.lora_B.weight"] = torch.randn(width, rank, generator=gen) * 0.2
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(out), "bias": "none",
        "base_model_name_or_path": model_dir, "task_type": "CAUSAL_LM"}))
    return str(target)


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapters = {name: LoRARequest(name, i + 1, make_adapter(Path(spec["workdir"]) / name, spec["model"], seed=i))
                for i, name in enumerate(("alpha", "beta"))}
    kwargs: dict = {}
    if spec.get("kvtier") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_role="kv_both", kv_connector_extra_config=spec["kvtier"])
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=2048, enforce_eager=True, seed=0, block_size=128,
              enable_lora=True, max_lora_rank=8, max_loras=2, **kwargs)
    rng = random.Random(7)
    prompt = [rng.randrange(10, 4000) for _ in range(520)]
    sampling = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    runs = []
    for adapter in spec["sequence"]:
        if spec.get("reset", True):
            time.sleep(0.3)  # let the previous request's saves land
            llm.reset_prefix_cache()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sampling, use_tqdm=False,
                           lora_request=adapters.get(adapter))[0]
        runs.append({"adapter": adapter, "cached": out.num_cached_tokens, "output": list(out.outputs[0].token_ids)})
    print("E2E-RESULT " + json.dumps({"runs": runs}), flush=True)


if __name__ == "__main__":
    main()
