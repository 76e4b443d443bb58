"""Smoke test of ``kvtier bench``: the small preset cut to 2 conversations x 2 turns, the reference and one kvtier
configuration (two engine starts), checked for the report's structure and for the correctness check; plus fast
tests of the pieces (settings, prompts, the output comparison, error extraction).

vLLM's KV space is the smallest the engine accepts for max_model_len 896 (8 blocks of 128 tokens), so the
second conversation pushes the first one's history out of vLLM's own cache and kvtier has to serve it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier_bench.runner import root_cause
from kvtier_bench.settings import load_settings
from kvtier_bench.stats import check_against, percentile
from kvtier_bench.workload import from_trace, load_tokenizer
from kvtier.errors import ConfigError
from kvtier_bench.models import build_model

SETTINGS = """\
preset: small
workload: {conversations: 2, turns: 2, answer_tokens: 32}
engine: {kv_cache_bytes: 2MiB, max_model_len: 896}
configs: [kvtier-dram, lmcache]
rounds: 2
timeout_s: 600
"""


def test_settings_merge_and_name_the_bad_key() -> None:
    settings = load_settings("small", overrides={"workload": {"turns": 5}, "policies": ["arc"]})
    assert settings.workload.turns == 5 and settings.policies == ("arc",)
    assert settings.engine.kv_cache_bytes == 3 * 2**20
    with pytest.raises(ConfigError, match="workload.turnz: unknown key"):
        load_settings("small", overrides={"workload": {"turnz": 5}})
    with pytest.raises(ConfigError, match="configs: unknown configuration 'nope'"):
        load_settings("small", overrides={"configs": ["nope"]})
    for example in Path(__file__).resolve().parents[1].joinpath("configs").glob("bench-*.yaml"):
        assert load_settings(path=str(example)).workload.conversations >= 1
    assert load_settings("large").policies == ("lru", "lfu", "arc", "attention")


def test_prompts_are_the_chat_template_in_token_ids(tmp_path: Path) -> None:
    tok = load_tokenizer(build_model("tiny"))
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a cache?"},
                {"role": "assistant", "content": "A place to keep things."}, {"role": "user", "content": "And KV?"}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"messages": messages}]))
    turns = from_trace(load_settings("small").workload, tok, str(trace)).conversations[0].turns
    answer = tok.encode(messages[2]["content"], add_special_tokens=False)
    assert turns[0].max_tokens == len(answer)
    # The history (first prompt + the answer's own tokens) plus the next segment is what the template renders.
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert turns[0].segment + answer + turns[1].segment == list(expected["input_ids"])


def _record(conv: int, turn: int, cached: int, output: list[int]) -> dict:
    return {"conv": conv, "turn": turn, "num_cached_tokens": cached, "output": output}


def test_output_check_fails_only_on_a_strict_mismatch() -> None:
    ref = [_record(0, 0, 0, [1, 2]), _record(1, 0, 128, [3, 4]), _record(0, 1, 256, [5, 6]), _record(1, 1, 256, [7])]
    reference = {"check_requests": ref, "rounds": [{"requests": ref}]}

    def run(records: list[dict]) -> dict:
        return check_against(reference, {"check_requests": records, "rounds": [{"requests": records}]})

    assert run(ref)["passed"] and run(ref)["strict"] == 4
    # Same split as the reference, different tokens: only wrong KV can do that.
    bad = run([ref[0], ref[1], _record(0, 1, 256, [5, 9]), ref[3]])
    assert not bad["passed"] and bad["mismatches"][0]["first_diff_token"] == 1
    # It recomputed what the reference reused: from there on the arithmetic differs, informational only.
    other = run([ref[0], _record(1, 0, 0, [3, 8]), ref[2], _record(1, 1, 0, [7])])
    assert other["passed"] and other["strict"] == 1
    assert other["different_split"] == 2 and other["different_split_identical"] == 1
    assert other["not_comparable"] == 1  # conversation 1 diverged: its next prompt differs
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 50) is None


def test_root_cause_skips_vllms_generic_error() -> None:
    log = ("[rank0]: Exception: CPU Offloading is currently only supported on CUDA-alike and XPU GPUs\n"
           "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n")
    assert root_cause(log, 1) == "Exception: CPU Offloading is currently only supported on CUDA-alike and XPU GPUs"
    assert root_cause("nothing useful", 3) == "exited with code 3 (see the engine log)"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench")
    settings = out / "settings.yaml"
    settings.write_text(SETTINGS)
    proc = subprocess.run([sys.executable, "-m", "kvtier", "bench", "--config", str(settings), "--out", str(out),
                           "--no-progress"], check=False, capture_output=True, text=True, timeout=900)
    assert (out / "results.json").exists(), f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "results.json").read_text()), out, proc


def by_name(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["results"]}


@pytest.mark.e2e
def test_runs_and_writes_table_and_plots(report: tuple[dict, Path, subprocess.CompletedProcess[str]]) -> None:
    data, out, proc = report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "| config | TTFT p50 ms per round: median (min–max) | TTFT p50 / p90 / p99 ms" in table
    assert "| kvtier-dram |" in table and "TTFT vs reference" in table
    ran = data["kv_cache_bytes"]  # the KV spaces the engines ran with, which the header states
    assert f"vLLM KV space {ran['kvtier-dram'] / 2**20:.1f} MiB (reference: {ran['reference'] / 2**20:.1f} MiB" in table
    assert "| all turns, per round | steps leaving requests queued (most queued) |" in table
    for png in ("ttft_by_turn.png", "hits_by_tier.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["plots"] == ["ttft_by_turn.png", "hits_by_tier.png"]
    assert data["settings"]["workload"]["conversations"] == 2 and data["workload"]["requests"] == 4
    [comparison] = data["comparisons"]  # kvtier-dram against the reference, with a bootstrap interval
    ttft = comparison["ratios"]["reference"]["ttft"]
    assert comparison["name"] == "kvtier-dram" and ttft["ci95"][0] <= ttft["ratio"] <= ttft["ci95"][1]


@pytest.mark.e2e
def test_every_configuration_has_metrics(report: tuple[dict, Path, subprocess.CompletedProcess[str]]) -> None:
    rows = by_name(report[0])
    assert [name for name, row in rows.items() if row["status"] == "ok"] == ["reference", "kvtier-dram"]
    for row in rows.values():
        if row["status"] != "ok":
            continue
        m = row["summary"]
        assert m["requests"] == 8  # two rounds of 4
        assert set(m["ttft_ms"]) == {"p50", "p90", "p99", "mean"} and m["ttft_ms"]["p50"] > 0
        assert set(m["ttft_by_turn_ms"]) == {"0", "1"} and all(t["n"] == 4 for t in m["ttft_by_turn_ms"].values())
        assert m["itl_ms"]["p50"] > 0 and m["e2e_ms"]["p50"] >= m["ttft_ms"]["p50"] * 0.5
        assert m["requests_per_s"] > 0 and m["output_tokens_per_s"] > 0 and m["peak_rss_bytes"] > 0
        assert m["rounds"] == 2 and len(row["rounds"]) == 2 and len(row["check_requests"]) == 4
        for req in row["rounds"][0]["requests"] + row["rounds"][1]["requests"]:
            assert len(req["output"]) == 32 and req["token_s"] == sorted(req["token_s"])
            assert req["token_s"][0] > req["arrival_s"]
        assert sum(m["hit_tokens_by_tier"].values()) == m["cached_tokens"]
        # vLLM's waiting queue, watched after every step of the timed round (the engine core is in-process)
        queue = m["queue"]
        assert queue["steps"] > 0 and 0 <= queue["waiting_steps"] <= queue["steps"], queue
    # The reference's KV space never fills: two conversations are always admitted at once.
    assert rows["reference"]["summary"]["queue"]["waiting_steps"] == 0
    kv = rows["kvtier-dram"]["summary"]["kvtier"]
    assert kv["saved_bytes"] > 0 and kv["load_failed_blocks"] == 0 and "dram" in kv["usage"]
    # Turn 1 re-uses the history: the second turn of each conversation hits.
    assert rows["kvtier-dram"]["summary"]["hit_rate_by_turn"]["1"] > 0.5
    # The second round began with kvtier's tiers emptied (its clear and the deletes done before the round, not
    # inside it), and its first request found nothing to reuse anywhere.
    second = rows["kvtier-dram"]["rounds"][1]
    assert second["kvtier_blocks_at_start"] and not any(second["kvtier_blocks_at_start"].values()), second
    assert min(second["requests"], key=lambda r: r["arrival_s"])["num_cached_tokens"] == 0


@pytest.mark.e2e
def test_unavailable_baseline_is_reported(report: tuple[dict, Path, subprocess.CompletedProcess[str]]) -> None:
    row = by_name(report[0])["lmcache"]
    if row["status"] == "ok":
        pytest.skip("lmcache is installed and started here")
    assert row["status"] == "not supported here" and row["error"]
    assert f"**lmcache**: not supported here: {row['error']}" in (report[1] / "results.md").read_text()


@pytest.mark.e2e
def test_correctness_check_passes_with_kvtier_serving_blocks(
        report: tuple[dict, Path, subprocess.CompletedProcess[str]]) -> None:
    check = by_name(report[0])["kvtier-dram"]["check"]
    assert check["passed"], check
    # Every request of the correctness pass re-used exactly what the reference re-used, tokens were
    # identical, and some of those tokens came out of kvtier (not only vLLM's own cache).
    assert check["strict"] == check["strict_identical"] == 4, check
    assert check["strict_with_hits"] >= 2 and check["kvtier_loaded_blocks"] >= 1, check
    assert check["timed_run"]["compared"] >= 2


def test_the_default_preset_is_in_kvtiers_regime() -> None:
    """The default preset's distinct history (full blocks, the shared system prompt once) is at least 4x what
    vLLM's KV space holds (issue 12), while a whole history fits in it (no request waits forever for room); the
    report's working-set figure counts the same thing in tokens."""
    from kvtier_bench.models import kv_bytes_per_token
    from kvtier_bench.workload import generate, working_set_tokens

    settings = load_settings()
    assert settings.preset == "chat"
    model = build_model(settings.model)
    cfg = json.loads(Path(model, "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    token_bytes = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 2  # bf16 K and V
    block = settings.engine.block_size
    kv_blocks = settings.engine.kv_cache_bytes // (token_bytes * block)
    workload = generate(settings.workload, load_tokenizer(model))
    distinct: set[tuple[int, ...]] = set()
    longest = 0
    for conv in workload.conversations:
        history: list[int] = []
        for turn in conv.turns:
            history += turn.segment
            history += [-(conv.conv_id + 1)] * turn.max_tokens  # answers: this conversation's own tokens
        longest = max(longest, len(history))
        distinct |= {tuple(history[:end]) for end in range(block, len(history) + 1, block)}
    assert len(distinct) >= 4 * kv_blocks, (len(distinct), kv_blocks)
    assert longest <= min(kv_blocks * block, settings.engine.max_model_len)
    assert kv_bytes_per_token(model) == token_bytes
    partial_blocks = len(workload.conversations) * block  # each history's last, partial block
    assert 0 <= working_set_tokens(workload) - len(distinct) * block <= partial_blocks


def test_changing_a_text_length_keeps_the_arrivals_and_think_times() -> None:
    """Text and timing come from separate random streams, so two presets that differ only in text lengths are
    compared under the same arrivals and pauses."""
    from kvtier_bench.workload import generate

    tok = load_tokenizer(build_model("tiny"))
    base = load_settings("quick").workload
    longer = load_settings("quick", overrides={"workload": {"document_tokens": 300, "system_tokens": 100}}).workload

    def timing(workload):  # type: ignore[no-untyped-def]
        return [(c.arrival_s, [t.think_time_s for t in c.turns]) for c in workload.conversations]

    a, b = generate(base, tok), generate(longer, tok)
    assert timing(a) == timing(b) and len(set(timing(a)[0][1])) > 1
    assert a.conversations[0].turns[0].segment != b.conversations[0].turns[0].segment
