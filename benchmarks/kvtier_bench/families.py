"""Workload families for the attention-eviction benchmarks: token-id request sequences, one request at a time.

Every family draws its text from the trained model's corpus (Python stdlib source, ``train.load_corpus``) and
shares one system block (BOS + 127 corpus tokens). A *quote* is a span copied from the document or history:
the trained model attends to its source (it was trained on document + ``<|user|>`` + quote); any other
question is a corpus span from elsewhere, so both kinds of question come from one distribution and only where
the model attends tells them apart.

- ``engaged``: engaged vs one-off documents (bench_attention.py's workload, unchanged): each round opens
  ``opens`` conversations with their own document and a question; the first ``engaged`` quote their document
  and come back ``gap`` and ``2*gap`` rounds later with more quotes; the others never return.
- ``chat``: multi-turn chat with growing histories: conversations arrive at random, each runs 2..``max_turns``
  turns, the user returning after an exponential think time; a turn appends an answer and a question (a quote
  of the history with probability ``quote_p``). Whether and when a user returns does not depend on what the
  model attends to.
- ``rag``: a few documents reused by many requests: each request retrieves one of ``docs`` documents by a Zipf
  popularity and asks a different question (a quote of that document with probability ``quote_p``).
  Popularity, not attention, says which document comes back.

``follow_ups`` marks the requests the benchmark scores: returning turns (engaged, chat) and repeat retrievals
(rag).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 128


@dataclass
class Req:
    conv: int
    turn: int  # 0 = opening, 1.. = follow-ups (rag: how many earlier requests retrieved the same document)
    engaged: bool  # the question quotes the document or history
    prompt: list[int]


@dataclass
class Source:
    """The corpus stream, the ``<|user|>`` token id and the seeded RNG a workload is drawn from."""

    stream: list[int]
    user: int
    rng: random.Random
    system: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.system = [0] + self.stream[:BLOCK - 1]  # BOS + one shared block

    def span(self, n: int) -> list[int]:
        at = self.rng.randrange(BLOCK, len(self.stream) - n)
        return self.stream[at:at + n]

    def quote(self, doc: list[int], n: int) -> list[int]:
        at = self.rng.randrange(len(doc) - n)
        return doc[at:at + n]


def open_source(model_dir: str, seed: int) -> Source:
    from tokenizers import Tokenizer

    from kvtier_bench.train import load_corpus

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    stream, _ = load_corpus(Path(model_dir) / "tokenizer.json", 3_000_000)
    return Source(stream, tok.token_to_id("<|user|>"), random.Random(seed))


def engaged(src: Source, rounds: int = 8, opens: int = 6, engaged: int = 2, gap: int = 2, doc_blocks: int = 4,
            question_len: int = 48, answer_len: int = 16) -> list[Req]:
    """Engaged vs one-off documents (the RNG is consumed exactly as bench_attention.py always did)."""
    docs: dict[int, list[int]] = {}
    history: dict[int, list[int]] = {}
    due: dict[int, list[int]] = {}
    reqs: list[Req] = []
    turns: dict[int, int] = {}
    conv = 0
    for rnd in range(rounds + 2 * gap):
        if rnd < rounds:
            for i in range(opens):
                engages = i < engaged
                docs[conv] = src.span(doc_blocks * BLOCK)
                question = src.quote(docs[conv], question_len) if engages else src.span(question_len)
                history[conv] = src.system + docs[conv] + [src.user] + question
                reqs.append(Req(conv, 0, engages, list(history[conv])))
                turns[conv] = 1
                if engages:
                    due.setdefault(rnd + gap, []).append(conv)
                    due.setdefault(rnd + 2 * gap, []).append(conv)
                conv += 1
        for c in due.pop(rnd, []):
            history[c] = history[c] + src.span(answer_len) + [src.user] + src.quote(docs[c], question_len)
            reqs.append(Req(c, turns[c], True, list(history[c])))
            turns[c] += 1
    return reqs


def chat(src: Source, conversations: int = 24, max_turns: int = 6, arrival_gap: float = 1.0,
         think: float = 6.0, doc_blocks: tuple[int, int] = (1, 3), question_len: int = 64,
         answer_len: int = 64, quote_p: float = 0.5) -> list[Req]:
    """Multi-turn chat: requests in time order; each turn's prompt is the last one + answer + question."""
    rng = src.rng
    events: list[tuple[float, int, int]] = []  # (time, conversation, turn)
    now = 0.0
    plan: list[int] = []
    for c in range(conversations):
        now += rng.expovariate(1.0 / arrival_gap)
        plan.append(rng.randint(2, max_turns))
        heapq.heappush(events, (now, c, 0))
    history: dict[int, list[int]] = {}
    reqs: list[Req] = []
    while events:
        when, c, turn = heapq.heappop(events)
        quotes = rng.random() < quote_p
        if turn == 0:
            doc = src.span(rng.randint(*doc_blocks) * BLOCK)
            question = src.quote(doc, question_len) if quotes else src.span(question_len)
            history[c] = src.system + doc + [src.user] + question
        else:
            answer = src.span(answer_len)
            past = history[c][BLOCK:]
            question = src.quote(past, question_len) if quotes else src.span(question_len)
            history[c] = history[c] + answer + [src.user] + question
        reqs.append(Req(c, turn, quotes, list(history[c])))
        if turn + 1 < plan[c]:
            heapq.heappush(events, (when + rng.expovariate(1.0 / think), c, turn + 1))
    return reqs


def rag(src: Source, docs: int = 10, requests: int = 120, zipf: float = 1.0, doc_blocks: int = 4,
        question_len: int = 48, quote_p: float = 0.5) -> list[Req]:
    """RAG-like: system + one retrieved document + a question; documents drawn by Zipf popularity."""
    rng = src.rng
    texts = [src.span(doc_blocks * BLOCK) for _ in range(docs)]
    rank = list(range(docs))
    rng.shuffle(rank)  # which document is the most popular is random
    weights = [1.0 / (rank[d] + 1) ** zipf for d in range(docs)]
    seen: dict[int, int] = {}
    reqs: list[Req] = []
    for _ in range(requests):
        d = rng.choices(range(docs), weights)[0]
        quotes = rng.random() < quote_p
        question = src.quote(texts[d], question_len) if quotes else src.span(question_len)
        reqs.append(Req(d, seen.get(d, 0), quotes, src.system + texts[d] + [src.user] + question))
        seen[d] = seen.get(d, 0) + 1
    return reqs


FAMILIES: dict[str, Callable[..., list[Req]]] = {"engaged": engaged, "chat": chat, "rag": rag}


def build(family: str, model_dir: str, seed: int, params: dict[str, Any] | None = None) -> list[Req]:
    return FAMILIES[family](open_source(model_dir, seed), **(params or {}))


def hittable(reqs: list[Req]) -> list[int]:
    """Tokens of each prompt an unbounded cache could serve: whole blocks seen before, minus the last token."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for r in reqs:
        full = (len(r.prompt) - 1) // BLOCK
        hit = 0
        while hit < full and tuple(r.prompt[:(hit + 1) * BLOCK]) in seen:
            hit += 1
        out.append(hit * BLOCK)
        for b in range(1, len(r.prompt) // BLOCK + 1):
            seen.add(tuple(r.prompt[:b * BLOCK]))
    return out


def follow_ups(reqs: list[Req]) -> list[int]:
    """Indices of the requests scored as follow-ups: returning turns, repeat retrievals."""
    return [i for i, r in enumerate(reqs) if r.turn > 0]
