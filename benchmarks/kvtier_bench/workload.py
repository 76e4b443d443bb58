"""Multi-turn chat workload: conversations as token-id segments, arrival times and think times.

Every prompt follows the model's chat template (``<|bos|><|system|>\\n…<|end|>\\n<|user|>\\n…<|end|>\\n
<|assistant|>\\n``), rendered segment by segment into token ids so that the answer a configuration generated is
fed back as exactly the tokens it produced: turn t's prompt is turn t-1's prompt + its answer + segment t.
Segment 0 holds the shared system prompt, the user's document and the first question; segment t > 0 closes
the previous answer and asks the next question.

The workload is generated once per benchmark run and handed to every configuration, so they all see the
same conversations, arrival times and think times.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from kvtier_bench.settings import WorkloadSettings
from kvtier.errors import ConfigError

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "ve", "so", "di", "pa", "zu", "ho", "en", "ar", "il", "ou")
_WORDS = ("the", "cache", "block", "token", "model", "answer", "question", "request", "memory", "layer", "disk",
          "value", "system", "user", "prompt", "history", "and", "of", "to", "in", "is", "for", "with", "that")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class Turn:
    segment: list[int]       # token ids appended to the history before generating
    max_tokens: int          # answer length (EOS ignored, so exactly this many)
    think_time_s: float      # pause after the previous answer before this turn arrives (turn 0: 0)


@dataclass
class Conversation:
    conv_id: int
    arrival_s: float         # when the first turn arrives, from the start of the run
    turns: list[Turn]


@dataclass
class Workload:
    conversations: list[Conversation]
    source: str              # "generated" or the trace path

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Workload:
        convs = [Conversation(c["conv_id"], c["arrival_s"], [Turn(**t) for t in c["turns"]])
                 for c in data["conversations"]]
        return Workload(convs, data["source"])


def load_tokenizer(model_dir: str) -> Tokenizer:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)  # type: ignore[no-any-return]


def _text(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        word = rng.choice(_WORDS) if rng.random() < 0.6 else "".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4)))
        out.append(word + ("." if i % 12 == 11 else ""))
    return " ".join(out)


def _tokens(tok: Tokenizer, rng: random.Random, count: int) -> list[int]:
    """Exactly ``count`` token ids of pseudo-text."""
    if count == 0:
        return []
    ids: list[int] = []
    while len(ids) < count:
        ids += tok.encode(" " + _text(rng, count), add_special_tokens=False)
    return ids[:count]


def _opening(tok: Tokenizer, system: list[int], user: list[int]) -> list[int]:
    return (tok.encode("<|bos|><|system|>\n", add_special_tokens=False) + system
            + tok.encode("<|end|>\n<|user|>\n", add_special_tokens=False) + user
            + tok.encode("<|end|>\n<|assistant|>\n", add_special_tokens=False))


def _follow_up(tok: Tokenizer, user: list[int]) -> list[int]:
    return (tok.encode("<|end|>\n<|user|>\n", add_special_tokens=False) + user
            + tok.encode("<|end|>\n<|assistant|>\n", add_special_tokens=False))


def _arrivals(rng: random.Random, count: int, rate: float) -> list[float]:
    times, now = [], 0.0
    for i in range(count):
        if i and rate > 0:
            now += rng.expovariate(rate)
        times.append(round(now, 4))
    return times


def _think(rng: random.Random, mean: float) -> float:
    return round(rng.expovariate(1.0 / mean), 4) if mean > 0 else 0.0


def generate(settings: WorkloadSettings, tok: Tokenizer) -> Workload:
    if settings.trace:
        return from_trace(settings, tok, settings.trace)
    # Text and timing draw from separate streams: changing a text length keeps the arrivals and think times.
    rng, timing = random.Random(settings.seed), random.Random(f"timing-{settings.seed}")
    system = _tokens(tok, rng, settings.system_tokens)
    arrivals = _arrivals(timing, settings.conversations, settings.arrival_rate)
    convs = []
    for c in range(settings.conversations):
        document = _tokens(tok, rng, settings.document_tokens)
        turns = []
        for t in range(settings.turns):
            question = _tokens(tok, rng, settings.question_tokens)
            segment = _opening(tok, system, document + question) if t == 0 else _follow_up(tok, question)
            turns.append(Turn(segment, settings.answer_tokens,
                              0.0 if t == 0 else _think(timing, settings.think_time_s)))
        convs.append(Conversation(c, arrivals[c], turns))
    return Workload(convs, "generated")


def from_trace(settings: WorkloadSettings, tok: Tokenizer, path: str) -> Workload:
    """Conversations in OpenAI-messages format: a JSON list whose items are message lists or
    ``{"messages": [...]}``. Each user message is a turn; the system message (if any) opens the conversation;
    an assistant message's token length sets the preceding turn's answer length (its text is not used: the
    model's own answer is fed back). Arrivals and think times come from the settings."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"workload.trace: cannot read {path}: {exc}") from exc
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"workload.trace: {path}: expected a non-empty JSON list of conversations")
    rng = random.Random(settings.seed)
    arrivals = _arrivals(rng, len(raw), settings.arrival_rate)
    convs = []
    for c, item in enumerate(raw):
        messages = item.get("messages") if isinstance(item, dict) else item
        if not isinstance(messages, list):
            raise ConfigError(f"workload.trace: conversation {c}: expected a list of messages")
        convs.append(Conversation(c, arrivals[c], _trace_turns(settings, tok, rng, messages, c)))
    return Workload(convs, path)


def _trace_turns(settings: WorkloadSettings, tok: Tokenizer, rng: random.Random,
                 messages: list[Any], conv: int) -> list[Turn]:
    system: list[int] = []
    turns: list[Turn] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant") \
                or not isinstance(msg.get("content"), str):
            raise ConfigError(f"workload.trace: conversation {conv} message {i}: expected "
                              "{'role': system|user|assistant, 'content': str}")
        ids = tok.encode(msg["content"], add_special_tokens=False)
        if msg["role"] == "system":
            system = ids
        elif msg["role"] == "user":
            segment = _opening(tok, system, ids) if not turns else _follow_up(tok, ids)
            turns.append(Turn(segment, settings.answer_tokens, 0.0 if not turns else _think(rng, settings.think_time_s)))
        elif turns:
            turns[-1].max_tokens = max(1, len(ids))
    if not turns:
        raise ConfigError(f"workload.trace: conversation {conv} has no user message")
    return turns


def working_set_tokens(workload: Workload) -> int:
    """Distinct tokens of history over all conversations by their last turn (answers included): the prefix every
    conversation opens with (the shared system prompt) counts once."""
    firsts = [c.turns[0].segment for c in workload.conversations if c.turns]
    shared = 0
    while firsts and all(len(f) > shared and f[shared] == firsts[0][shared] for f in firsts):
        shared += 1
    total = sum(len(t.segment) + t.max_tokens for c in workload.conversations for t in c.turns)
    return total - shared * max(0, len(firsts) - 1)


def check_fits(workload: Workload, max_model_len: int) -> None:
    """Every conversation's last prompt plus its answer must fit the engine's max_model_len."""
    for conv in workload.conversations:
        total = sum(len(t.segment) + t.max_tokens for t in conv.turns)
        if total > max_model_len:
            raise ConfigError(f"conversation {conv.conv_id} needs {total} tokens, more than "
                              f"engine.max_model_len={max_model_len}: use fewer turns or shorter texts")
