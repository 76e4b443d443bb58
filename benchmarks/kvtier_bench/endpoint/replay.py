"""Replay the workload against a server: one thread per conversation, the engine driver's timing rules.

A conversation's first turn is sent at its arrival time; each later turn at the previous answer's last token
plus its think time. So the arrivals (Poisson), think times and concurrency (every conversation that has
arrived and is not thinking has one request in flight) are the engine driver's (kvtier_bench.driver.replay).
Each request is ``/v1/completions`` with the prompt as token ids (history + the turn's segment), greedy,
``ignore_eos`` and ``min_tokens = max_tokens`` (so neither EOS nor the model's default stop tokens end an
answer early), streamed with ``return_token_ids``: every chunk carries the ids of the tokens it adds, and
those ids, exactly, extend the conversation's history. TTFT is measured from the request's scheduled arrival,
ITL between chunks (tokens that arrive in one chunk share its time, as tokens of one engine step do).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvtier_bench.endpoint.client import Endpoint, EndpointError, StreamResult
from kvtier_bench.workload import Conversation, Workload


def completion_payload(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "n": 1, "return_token_ids": True,
            "stream_options": {"include_usage": True}}


def cached_tokens(usage: dict[str, Any]) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` (vLLM sends it with --enable-prompt-tokens-details)."""
    details = usage.get("prompt_tokens_details") or {}
    value = details.get("cached_tokens")
    return int(value) if isinstance(value, int) else None


def request_record(conv: int, turn: int, prompt: list[int], max_tokens: int, arrival_s: float,
                   sent_s: float, res: StreamResult) -> dict[str, Any]:
    """One request as the engine driver records it, plus what the server said about it."""
    if not res.output:
        raise EndpointError(f"conversation {conv} turn {turn}: the server streamed no token")
    if res.prompt_token_ids is not None and res.prompt_token_ids != prompt:
        raise EndpointError(f"conversation {conv} turn {turn}: the server's prompt token ids differ from the "
                            "ones sent (it added or changed tokens)")
    if len(res.output) != max_tokens:
        raise EndpointError(f"conversation {conv} turn {turn}: {len(res.output)} tokens generated, "
                            f"{max_tokens} asked for (finish reason {res.finish_reason!r})")
    cached = cached_tokens(res.usage)
    return {"conv": conv, "turn": turn, "prompt_len": len(prompt), "arrival_s": round(arrival_s, 6),
            "added_s": round(sent_s, 6), "token_s": [round(t, 6) for t in res.token_s], "output": res.output,
            "num_cached_tokens": cached or 0, "cached_reported": cached is not None,
            "prompt_echo_matched": res.prompt_token_ids is not None,  # the server read back exactly our ids
            "finish_s": round(res.token_s[-1], 6), "finish_reason": res.finish_reason,
            "server_prompt_tokens": res.usage.get("prompt_tokens"),
            "server_completion_tokens": res.usage.get("completion_tokens")}


@dataclass
class Sink:
    """What the conversation threads hand back (thread-safe)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(record)

    def fail(self, conv: int, turn: int, error: str) -> None:
        with self.lock:
            self.failures.append({"conv": conv, "turn": turn, "error": error})

    @property
    def done(self) -> int:
        with self.lock:
            return len(self.requests) + len(self.failures)


def _conversation(ep: Endpoint, model: str, conv: Conversation, t0: float, sink: Sink) -> None:
    history: list[int] = []
    arrival = conv.arrival_s
    for index, turn in enumerate(conv.turns):
        time.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        prompt = history + turn.segment
        sent = time.perf_counter() - t0
        try:
            res = ep.stream_completion(completion_payload(model, prompt, turn.max_tokens), t0)
            record = request_record(conv.conv_id, index, prompt, turn.max_tokens, arrival, sent, res)
        except EndpointError as exc:
            sink.fail(conv.conv_id, index, str(exc))
            return  # without this answer the conversation has no next prompt
        sink.add(record)
        history = prompt + record["output"]
        if index + 1 < len(conv.turns):
            arrival = record["finish_s"] + conv.turns[index + 1].think_time_s


def replay(ep: Endpoint, model: str, workload: Workload, timeout_s: float,
           tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One timed round: every conversation, start to end. Requests that did not complete are ``failures``."""
    sink = Sink()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=_conversation, args=(ep, model, conv, t0, sink), daemon=True,
                                name=f"conv-{conv.conv_id}") for conv in workload.conversations]
    for thread in threads:
        thread.start()
    deadline = t0 + timeout_s
    while any(t.is_alive() for t in threads) and time.perf_counter() < deadline:
        time.sleep(0.1)
        if tick is not None:
            tick(sink.done)
    with sink.lock:
        requests = sorted(sink.requests, key=lambda r: (r["arrival_s"], r["conv"]))
        failures = list(sink.failures)
    # The round's work ends with its last token (the engine driver's loop ends there too).
    wall = max((r["finish_s"] for r in requests), default=time.perf_counter() - t0)
    if any(t.is_alive() for t in threads):
        failures.append({"conv": None, "turn": None, "error": f"the round did not finish within {timeout_s:.0f} s"})
    return {"requests": requests, "failures": failures, "wall_s": round(wall, 3)}


def reset_caches(ep: Endpoint, mode: str, attempts: int = 100) -> str:
    """Empty the server's caches before a round: ``all`` = vLLM's prefix cache and the connector's store,
    ``vllm`` = vLLM's prefix cache only, ``none`` = nothing. Returns what happened, for the report."""
    if mode == "none":
        return "not reset (--reset none)"
    path = "/reset_prefix_cache" + ("?reset_external=true" if mode == "all" else "")
    what = "vLLM's prefix cache and the connector's store" if mode == "all" else "vLLM's prefix cache"
    for _ in range(attempts):  # fails while blocks are held (a save in flight): retry
        status, body = ep.call("POST", path)
        if status in (404, 405):
            return (f"not reset: the server has no /reset_prefix_cache (HTTP {status}; start it with "
                    "VLLM_SERVER_DEV_MODE=1)")
        if status == 200 and b'"success":false' not in body.replace(b" ", b""):
            return f"reset {what}"
        time.sleep(0.1)
    return f"not reset: /reset_prefix_cache kept failing (last HTTP {status}: {body[:200]!r})"


def warm_up(ep: Endpoint, model: str, workload: Workload) -> dict[str, Any]:
    """One short request (15 tokens: less than a block) that initialises the server's kernels and shows
    whether it returns token ids and per-request cached tokens."""
    prompt = workload.conversations[0].turns[0].segment[:15]
    t0 = time.perf_counter()
    res = ep.stream_completion(completion_payload(model, prompt, 4), t0)
    record = request_record(-1, 0, prompt, 4, 0.0, 0.0, res)
    return {"ttft_ms": round(record["token_s"][0] * 1000, 2), "cached_tokens_reported": record["cached_reported"]}
