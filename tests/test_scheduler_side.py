"""SchedulerSide logic on plain objects shaped like vLLM's (the e2e tests drive the real engine)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierWorkerMeta
from kvtier.connector.placement import StartupPlacement
from kvtier.connector.scheduler import SchedulerSide
from kvtier.keys import ModelFingerprint, block_keys

BS = 4
FP = ModelFingerprint(model="m", block_size=BS)


def side(tmp_path, **connector) -> SchedulerSide:  # type: ignore[no-untyped-def]
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1MiB"},
                                            {"kind": "disk", "capacity": "1MiB", "path": str(tmp_path)}],
                                  "connector": connector}, env={})
    return SchedulerSide(cfg, FP, BS)


def request(rid: str, tokens: list[int], prompt_len: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, all_token_ids=tokens, num_tokens=len(tokens),
                           num_prompt_tokens=prompt_len or len(tokens), num_output_tokens=0, cache_salt=None,
                           mm_features=None)


def blocks(ids: list[int]) -> SimpleNamespace:
    return SimpleNamespace(get_block_ids=lambda: (ids,))


def sched_output(new=(), cached_ids=(), cached_computed=(), scheduled=None):  # type: ignore[no-untyped-def]
    cached = SimpleNamespace(req_ids=list(cached_ids), resumed_req_ids=set(), new_block_ids=[None] * len(cached_ids),
                             num_computed_tokens=list(cached_computed))
    return SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached, num_scheduled_tokens=scheduled,
                           total_num_scheduled_tokens=sum((scheduled or {}).values()))


def stored(s: SchedulerSide, keys: list[bytes], tier: str = "dram") -> None:
    s.update_connector_output(KVTierWorkerMeta([(k, tier) for k in keys]))


def test_hit_stops_at_first_gap_and_leaves_last_token(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path)
    tokens = list(range(17))  # 4 full blocks + 1
    keys = block_keys(FP, tokens, BS)
    stored(s, keys)
    assert s.get_num_new_matched_tokens(request("a", tokens), 0) == (16, False)
    tokens16 = tokens[:16]  # exactly 4 blocks: the last token must be computed, so 3 blocks at most
    assert s.get_num_new_matched_tokens(request("b", tokens16), 0) == (12, False)
    s.update_connector_output(KVTierWorkerMeta([(keys[1], None)]))  # block 1 was dropped
    assert s.get_num_new_matched_tokens(request("c", tokens), 0) == (4, False)  # only block 0 before the gap
    assert s.get_num_new_matched_tokens(request("d", tokens), 8) == (0, False)  # vLLM already has more


def test_load_plan_targets_blocks_past_local_hit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path, async_load=True)
    tokens = list(range(17))
    keys = block_keys(FP, tokens, BS)
    stored(s, keys, tier="disk")
    req = request("a", tokens)
    assert s.get_num_new_matched_tokens(req, 4) == (12, True)
    s.update_state_after_alloc(req, blocks([10, 11, 12, 13, 14]), 12)
    meta = s.build_connector_meta(sched_output())
    assert [(l.keys, l.block_ids, l.is_async) for l in meta.loads] == [(keys[1:4], [11, 12, 13], True)]
    assert s.hit_sources(req) == {"disk": 12}
    assert s.build_connector_meta(sched_output()).loads == []  # a plan is sent once


def test_saves_are_planned_once_and_skip_stored_blocks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path)
    tokens = list(range(13))
    keys = block_keys(FP, tokens, BS)
    stored(s, keys[:1])
    req = request("a", tokens)
    s.get_num_new_matched_tokens(req, 0)
    new = SimpleNamespace(req_id="a", block_ids=([5, 6, 7, 8],), num_computed_tokens=0)
    meta = s.build_connector_meta(sched_output(new=[new], scheduled={"a": 13}))
    assert meta.saves == [(keys[1], 6), (keys[2], 7)]  # block 0 is already stored
    again = s.build_connector_meta(sched_output(cached_ids=["a"], cached_computed=[13], scheduled={"a": 1}))
    assert again.saves == []  # nothing twice (block 3 is not complete yet)
    s.update_connector_output(KVTierWorkerMeta([(keys[1], "dram"), (keys[2], None)]))
    assert keys[1] in s.index and keys[2] not in s.index and not s.pending_saves


@pytest.mark.parametrize("save_decode_blocks", [None, False])
def test_a_block_completed_by_the_answer_is_saved_unless_turned_off(tmp_path, save_decode_blocks) -> None:  # type: ignore[no-untyped-def]
    """A chat turn's next prompt is its history plus the answer: the block the answer completes is reused as
    often as the prompt's own blocks (vLLM's prefix cache keeps it too). Saved by default."""
    s = side(tmp_path) if save_decode_blocks is None else side(tmp_path, save_decode_blocks=save_decode_blocks)
    tokens = list(range(14))  # a 14-token prompt: blocks 0-2 full, block 3 half
    req = request("a", tokens, prompt_len=14)
    s.get_num_new_matched_tokens(req, 0)
    new = SimpleNamespace(req_id="a", block_ids=([5, 6, 7, 8],), num_computed_tokens=0)
    assert len(s.build_connector_meta(sched_output(new=[new], scheduled={"a": 14})).saves) == 3
    saves = []
    for computed in (14, 15):  # two decode steps: the tokens generated so far get their KV
        tokens.append(100 + computed)
        req.num_tokens = len(tokens)
        saves += s.build_connector_meta(sched_output(cached_ids=["a"], cached_computed=[computed],
                                                     scheduled={"a": 1})).saves
    if save_decode_blocks is None:
        assert saves == [(block_keys(FP, tokens, BS)[3], 8)]  # prompt tokens 12-13 + answer tokens 14-15
    else:
        assert saves == []


def test_reset_clears_index_and_tells_the_worker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path)
    stored(s, block_keys(FP, list(range(8)), BS))
    assert s.reset_cache() is True
    assert not len(s.index) and s.build_connector_meta(sched_output()).clear_store


def test_what_workers_restored_at_start_up_is_known_before_the_first_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys = block_keys(FP, list(range(12)), BS)
    s = side(tmp_path)
    stored(s, keys[2:3], tier="dram")  # a step's report is newer than any start-up report
    s.learn_startup([StartupPlacement.pack([("disk", keys[:3])]), StartupPlacement.pack([("s3", keys)])])
    assert [s.index.tier_of(k) for k in keys] == ["disk", "disk", "dram"]


# ---- request identity, with vLLM's own Request objects ------------------------------------------------------

def vllm_request(rid: str, tokens: list[int], **kwargs):  # type: ignore[no-untyped-def]
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, tokens, SamplingParams(max_tokens=4), None, **kwargs)


def hit_after_storing(s: SchedulerSide, stored_req, asked_req) -> int:  # type: ignore[no-untyped-def]
    """Store every full block of ``stored_req`` (as the worker would report), then ask for ``asked_req``."""
    state = s._state(stored_req)
    keys = state.chain.extend(list(stored_req.all_token_ids))
    stored(s, keys)
    return s.get_num_new_matched_tokens(asked_req, 0)[0]


def test_lora_adapters_salts_and_embeddings_get_disjoint_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from vllm.lora.request import LoRARequest

    tokens = list(range(1, 18))  # 4 full blocks + 1
    alpha, beta = LoRARequest("alpha", 1, "/adapters/alpha"), LoRARequest("beta", 2, "/adapters/beta")
    assert hit_after_storing(side(tmp_path), vllm_request("a", tokens, lora_request=alpha),
                             vllm_request("b", tokens, lora_request=beta)) == 0
    assert hit_after_storing(side(tmp_path), vllm_request("a", tokens, lora_request=alpha),
                             vllm_request("b", tokens)) == 0
    assert hit_after_storing(side(tmp_path), vllm_request("a", tokens, lora_request=alpha),
                             vllm_request("b", tokens, lora_request=LoRARequest("alpha", 7, "/adapters/alpha"))) == 16
    assert hit_after_storing(side(tmp_path), vllm_request("a", tokens, cache_salt="x"),
                             vllm_request("b", tokens, cache_salt="y")) == 0
    # Prompt embeddings: the token ids are placeholders (all 0); the embeddings decide the keys.
    embeds = torch.randn(17, 8)
    other = embeds.clone()
    other[9] += 1.0  # differs in block 2 only
    a = vllm_request("a", None, prompt_embeds=embeds)
    assert hit_after_storing(side(tmp_path), a, vllm_request("b", None, prompt_embeds=embeds.clone())) == 16
    assert hit_after_storing(side(tmp_path), a, vllm_request("c", None, prompt_embeds=other)) == 8


def test_multimodal_requests_are_never_loaded_nor_saved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path)
    req = request("mm", list(range(13)))
    req.mm_features = [object()]
    stored(s, block_keys(FP, list(range(13)), BS))
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    new = SimpleNamespace(req_id="mm", block_ids=([5, 6, 7, 8],), num_computed_tokens=0)
    s.pending_saves.clear()
    s.index.clear()
    assert s.build_connector_meta(sched_output(new=[new], scheduled={"mm": 13})).saves == []


def test_a_reset_moves_every_new_request_to_fresh_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path)
    tokens = list(range(17))
    before = s._state(request("a", tokens)).chain.extend(tokens)
    s.reset_cache()
    after = s._state(request("b", tokens)).chain.extend(tokens)
    assert not set(before) & set(after)


# ---- delayed block release (kvtier/connector/saving.py) ------------------------------------------------------

def test_a_request_with_saves_delays_its_release_and_the_workers_are_told(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path)
    a, b = request("a", list(range(13))), request("b", list(range(100, 102)))  # b has no full block
    for req, ids in ((a, [5, 6, 7, 8]), (b, [9])):
        s.get_num_new_matched_tokens(req, 0)
        s.update_state_after_alloc(req, blocks(ids), 0)
    new = [SimpleNamespace(req_id="a", block_ids=([5, 6, 7, 8],), num_computed_tokens=0),
           SimpleNamespace(req_id="b", block_ids=([9],), num_computed_tokens=0)]
    meta = s.build_connector_meta(sched_output(new=new, scheduled={"a": 13, "b": 2}))
    assert meta.save_reqs == ["a"] and len(meta.saves) == 3
    assert s.request_finished(a) is True  # its blocks may still be read by the copy
    assert s.request_finished(b) is False  # nothing reads its blocks
    nxt = s.build_connector_meta(sched_output())
    assert nxt.release_after_saves == ["a"] and nxt.saves == []
    assert s.build_connector_meta(sched_output()).release_after_saves == []  # announced once


def test_preempted_or_reallocated_requests_no_longer_delay_their_release(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path)
    a, c = request("a", list(range(13))), request("c", list(range(200, 213)))
    for req, ids, rid in ((a, [5, 6, 7, 8], "a"), (c, [1, 2, 3, 4], "c")):
        s.get_num_new_matched_tokens(req, 0)
        s.update_state_after_alloc(req, blocks(ids), 0)
        s.build_connector_meta(sched_output(new=[SimpleNamespace(req_id=rid, block_ids=(ids,), num_computed_tokens=0)],
                                            scheduled={rid: 13}))
    # a is preempted: vLLM freed its blocks already (the workers fence the copies out of them).
    so = sched_output()
    so.preempted_req_ids = {"a"}
    assert s.build_connector_meta(so).preempted == ["a"]
    assert s.request_finished(a) is False
    # c is preempted and allocated again, waiting for an async load when it is aborted: its new blocks were never
    # saved, and vLLM frees them when the load reports (a True here would free them twice).
    s.update_state_after_alloc(c, blocks([10, 11, 12, 13]), 0)
    assert s.request_finished(c) is False


def test_with_two_ranks_a_block_is_a_hit_only_when_both_shards_are_held(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvtier.keys import rank_key

    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1MiB"}]}, env={})
    s = SchedulerSide(cfg, FP, BS, world=2)
    tokens = list(range(17))
    keys = block_keys(FP, tokens, BS)
    stored(s, [rank_key(k, 0, 2) for k in keys])  # rank 0 holds all four blocks
    stored(s, [rank_key(k, 1, 2) for k in keys[:2]])  # rank 1 only the first two
    assert s.get_num_new_matched_tokens(request("a", tokens), 0) == (8, False)
    # Saves are planned per block; every rank's shard is pending until that rank reports it.
    new = SimpleNamespace(req_id="a", block_ids=([5, 6, 7, 8],), num_computed_tokens=0)
    meta = s.build_connector_meta(sched_output(new=[new], scheduled={"a": 17}))
    assert [k for k, _ in meta.saves] == keys[2:]
    assert {rank_key(k, r, 2) for k in keys[2:] for r in (0, 1)} <= s.pending_saves


def test_pipeline_parallelism_is_refused_naming_the_setting() -> None:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs

    from kvtier.connector.connector import KVTierConnector
    from kvtier.errors import ConfigError
    from kvtier_bench.models import build_model

    transfer = KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                                kv_connector_extra_config={"tiers": [{"kind": "dram", "capacity": "1MiB"}]})
    cfg = EngineArgs(model=build_model("tiny"), dtype="bfloat16", max_model_len=1024, enforce_eager=True,
                     pipeline_parallel_size=2, kv_transfer_config=transfer).create_engine_config()
    logger = logging.getLogger("kvtier")
    handlers, propagate = list(logger.handlers), logger.propagate
    try:
        with pytest.raises(ConfigError, match="pipeline_parallel_size=2 is not supported"):
            KVTierConnector(cfg, KVConnectorRole.SCHEDULER)
    finally:  # the connector sets up kvtier's own log handler; later tests read records through caplog
        logger.handlers[:], logger.propagate = handlers, propagate


def test_blocks_whose_saves_have_not_been_reported_yet_are_hits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A request ends at the step that planned its saves; the next request repeats it before any step could
    # report the saves. Its blocks count as held in the top tier (the worker waits for the save to land).
    s = side(tmp_path)
    tokens = list(range(13))
    keys = block_keys(FP, tokens, BS)
    s.get_num_new_matched_tokens(request("a", tokens), 0)
    new = SimpleNamespace(req_id="a", block_ids=([5, 6, 7, 8],), num_computed_tokens=0)
    assert len(s.build_connector_meta(sched_output(new=[new], scheduled={"a": 13})).saves) == 3
    again = request("b", tokens)
    assert s.get_num_new_matched_tokens(again, 0) == (12, False)
    s.update_state_after_alloc(again, blocks([1, 2, 3, 4]), 12)
    assert s.hit_sources(again) == {"dram": 12}
    s.update_connector_output(KVTierWorkerMeta([(keys[1], None)]))  # the save of block 1 failed
    assert s.get_num_new_matched_tokens(request("c", tokens), 0) == (4, False)


def test_a_step_with_nothing_scheduled_is_marked_idle(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = side(tmp_path, async_load=True)
    assert s.build_connector_meta(sched_output()).idle
    new = SimpleNamespace(req_id="a", block_ids=([5],), num_computed_tokens=0)
    assert not s.build_connector_meta(sched_output(new=[new], scheduled={"a": 16})).idle


def test_with_copies_that_end_in_their_step_a_finished_request_is_freed_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1MiB"}]}, env={})
    s = SchedulerSide(cfg, FP, BS, copies_end_in_step=True)  # host KV caches (the CPU build)
    a = request("a", list(range(13)))
    s.get_num_new_matched_tokens(a, 0)
    s.update_state_after_alloc(a, blocks([5, 6, 7, 8]), 0)
    meta = s.build_connector_meta(sched_output(new=[SimpleNamespace(req_id="a", block_ids=([5, 6, 7, 8],),
                                                                    num_computed_tokens=0)], scheduled={"a": 13}))
    assert len(meta.saves) == 3  # its blocks are saved, and the copies were done when the step returned
    assert s.request_finished(a) is False
    assert s.build_connector_meta(sched_output()).release_after_saves == []
