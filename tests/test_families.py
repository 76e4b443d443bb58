"""The attention benchmarks' workload families (benchmarks/kvtier_bench/families.py), on a synthetic token stream:
their shapes, what a follow-up is, and what an unbounded cache could serve."""

from __future__ import annotations

import random

from kvtier_bench.families import BLOCK, Source, chat, engaged, follow_ups, hittable, rag

USER = 3


def source(seed: int = 0) -> Source:
    return Source(list(range(10, 200_000)), USER, random.Random(seed))


def is_quote(question: list[int], text: list[int]) -> bool:
    n = len(question)
    return any(text[i:i + n] == question for i in range(len(text) - n + 1))


def test_engaged_documents_come_back_twice_one_offs_never() -> None:
    reqs = engaged(source(), rounds=4, opens=3, engaged=1, gap=1, doc_blocks=2, question_len=16, answer_len=4)
    assert len(reqs) == 4 * 3 + 2 * 4
    by_conv: dict[int, list[int]] = {}
    for r in reqs:
        by_conv.setdefault(r.conv, []).append(r.turn)
    assert sorted(len(t) for t in by_conv.values()) == [1] * 8 + [3] * 4
    for r in reqs:
        assert r.prompt[:BLOCK] == source().system
        doc = r.prompt[BLOCK:3 * BLOCK]
        assert is_quote(r.prompt[-16:], doc) == r.engaged  # engaged questions quote the document
    assert {i for i, r in enumerate(reqs) if r.turn > 0} == set(follow_ups(reqs))


def test_chat_histories_grow_and_every_return_can_reuse_the_last_prompt() -> None:
    reqs = chat(source(1), conversations=6, max_turns=4, question_len=32, answer_len=16)
    last: dict[int, list[int]] = {}
    for r in reqs:
        if r.turn:
            assert r.prompt[:len(last[r.conv])] == last[r.conv]  # prefix: the previous prompt
        last[r.conv] = r.prompt
    can = hittable(reqs)
    for i in follow_ups(reqs):
        assert can[i] >= BLOCK  # at least the system prompt and the earlier turns' full blocks


def test_rag_reuses_a_few_documents_and_counts_repeat_retrievals() -> None:
    reqs = rag(source(2), docs=4, requests=40, question_len=16)
    assert len({r.conv for r in reqs}) <= 4
    seen: set[int] = set()
    for r in reqs:
        assert (r.turn > 0) == (r.conv in seen)
        seen.add(r.conv)
    can = hittable(reqs)
    assert all(can[i] == 5 * BLOCK for i in follow_ups(reqs))  # the system block + the 4-block document


def test_same_seed_same_requests() -> None:
    for make in (engaged, chat, rag):
        assert [r.prompt for r in make(source(7))] == [r.prompt for r in make(source(7))]
