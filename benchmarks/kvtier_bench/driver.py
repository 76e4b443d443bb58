"""One configuration of the benchmark: start one vLLM engine, replay the workload, write a JSON result.

Run in its own process by kvtier_bench.runner: ``python -m kvtier_bench.driver SPEC.json RESULT.json``.
It starts the engine, prints ``BENCH-READY`` and then obeys commands on stdin, one per line: ``run`` (one
timed round of the workload; every round after the first starts from empty caches), ``check`` (the
correctness pass) and ``quit`` (shut down and write RESULT.json); each command ends with ``BENCH-DONE``.
The engine is driven step by step (``LLMEngine.add_request`` + ``step()``), so every request's first token
and every later token get a timestamp: TTFT is measured from the request's scheduled arrival time (it
includes any queueing), ITL is the gap between consecutive tokens of one request.
Prints ``BENCH-PROGRESS <done> <total>`` lines during a round for the progress bar.
"""

from __future__ import annotations

import heapq
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kvtier_bench.inengine import drain
from kvtier_bench.procs import compute_dtype, wait_for_startup_work
from kvtier_bench.workload import Workload


class PeakRss:
    """Samples the resident memory of this process and all its descendants (the engine's process tree)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def sample(self) -> None:
        import psutil

        total = 0
        for proc in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def read_stats(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def make_engine(spec: dict[str, Any]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    eng = spec["engine"]
    kwargs: dict[str, Any] = {}
    if spec.get("kv_transfer"):
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer"])
    return LLM(model=spec["model"], dtype=compute_dtype(), max_model_len=eng["max_model_len"], enforce_eager=True,
               seed=0, block_size=eng["block_size"], enable_prefix_caching=eng["enable_prefix_caching"],
               kv_cache_memory_bytes=eng["kv_cache_bytes"], **kwargs)


def sub_block_prompt(block_size: int) -> list[int]:
    """A prompt one token shorter than a block: it fills no block of its own."""
    return [7 + (i * 31) % 3000 for i in range(block_size - 1)]


def warm_up(engine: Any, block_size: int) -> None:
    """One request shorter than a block so kernels are initialised (prefill and decode). Its prompt fills no
    block; with its generated tokens it fills one, which kvtier may save (an unrelated block, never reused)."""
    generate_one(engine, "warmup", sub_block_prompt(block_size), 4)


def replay(engine: Any, workload: Workload) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    """Replay the conversations with their arrival and think times: one record per request, and how often
    requests were left waiting in vLLM's queue (QueueWatch)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    total = workload.num_requests
    history: dict[int, list[int]] = {c.conv_id: [] for c in workload.conversations}
    convs = {c.conv_id: c for c in workload.conversations}
    ready: list[tuple[float, int, int]] = [(c.arrival_s, c.conv_id, 0) for c in workload.conversations]
    heapq.heapify(ready)
    live: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    queue = QueueWatch(engine)
    t0 = time.perf_counter()
    while ready or live:
        now = time.perf_counter() - t0
        while ready and ready[0][0] <= now:
            arrival, conv_id, turn_idx = heapq.heappop(ready)
            turn = convs[conv_id].turns[turn_idx]
            prompt = history[conv_id] + turn.segment
            rid = f"c{conv_id}-t{turn_idx}"
            params = SamplingParams(temperature=0.0, max_tokens=turn.max_tokens, ignore_eos=True)
            engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
            live[rid] = {"conv": conv_id, "turn": turn_idx, "prompt_len": len(prompt), "arrival_s": arrival,
                         "added_s": time.perf_counter() - t0, "token_s": [], "prompt": prompt}
        if not live:
            time.sleep(max(0.0, min(0.05, ready[0][0] - (time.perf_counter() - t0))))
            continue
        outputs = engine.step()
        stamp = time.perf_counter() - t0
        queue.after_step()
        for out in outputs:
            rec = live[out.request_id]
            tokens = list(out.outputs[0].token_ids)
            rec["token_s"] += [stamp] * (len(tokens) - len(rec["token_s"]))
            if out.finished:
                rec.update(output=tokens, num_cached_tokens=out.num_cached_tokens or 0, finish_s=stamp)
                conv_id, turn_idx = rec["conv"], rec["turn"]
                history[conv_id] = rec.pop("prompt") + tokens
                del live[out.request_id]
                done.append(rec)
                print(f"BENCH-PROGRESS {len(done)} {total}", flush=True)
                if turn_idx + 1 < len(convs[conv_id].turns):
                    nxt = convs[conv_id].turns[turn_idx + 1]
                    heapq.heappush(ready, (stamp + nxt.think_time_s, conv_id, turn_idx + 1))
    return done, queue.summary()


class QueueWatch:
    """How often requests were left in vLLM's waiting queue after a step (not admitted: its KV space or its
    batch was full). The reference, whose KV space never fills, should have none; a configuration with a small
    KV space queues in bursts, which is part of its TTFT. Needs the engine core in this process (the default);
    with multiprocessing the summary is None."""

    def __init__(self, engine: Any) -> None:
        core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
        self.scheduler = getattr(core, "scheduler", None)
        self.steps = self.waiting_steps = self.max_waiting = 0

    def after_step(self) -> None:
        if self.scheduler is None:
            return
        waiting = len(self.scheduler.waiting)
        self.steps += 1
        self.waiting_steps += waiting > 0
        self.max_waiting = max(self.max_waiting, waiting)

    def summary(self) -> dict[str, int] | None:
        if self.scheduler is None:
            return None
        return {"steps": self.steps, "waiting_steps": self.waiting_steps, "max_waiting": self.max_waiting}


def generate_one(engine: Any, rid: str, prompt: list[int], max_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt),
                       SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    return final


def check_pass(llm: Any, workload: Workload) -> list[dict[str, Any]]:
    """The correctness pass: empty every cache (vLLM's and the connector's), then run the conversations one
    request at a time, turn by turn across conversations. One request per step makes the arithmetic
    independent of timing (a token computed in a batch with other requests' tokens may differ in the last
    bit), so every configuration's outputs can be compared with the reference's exactly."""
    reset_caches(llm)
    history: dict[int, list[int]] = {c.conv_id: [] for c in workload.conversations}
    records = []
    for turn_idx in range(max(len(c.turns) for c in workload.conversations)):
        for conv in workload.conversations:
            if turn_idx >= len(conv.turns):
                continue
            turn = conv.turns[turn_idx]
            prompt = history[conv.conv_id] + turn.segment
            out = generate_one(llm.llm_engine, f"check-c{conv.conv_id}-t{turn_idx}", prompt, turn.max_tokens)
            tokens = list(out.outputs[0].token_ids)
            records.append({"conv": conv.conv_id, "turn": turn_idx, "prompt_len": len(prompt),
                            "num_cached_tokens": out.num_cached_tokens or 0, "output": tokens})
            history[conv.conv_id] = prompt + tokens
    return records


def reset_caches(llm: Any) -> None:
    """Empty vLLM's prefix cache and the connector's store (kvtier clears its tiers at the next step)."""
    for _ in range(100):  # fails while a block is still held; saves drain within a step or two
        if llm.reset_prefix_cache(reset_connector=True):
            return
        # A finished request's blocks stay held until the worker reports its save copies done, which happens
        # in an engine step: in-process, nothing steps unless we do.
        llm.llm_engine.step()
        time.sleep(0.1)
    raise RuntimeError("reset_prefix_cache kept failing")


def _local_connector() -> Any:
    """The worker-side connector in this process (the engine core in-process), or None."""
    from vllm.distributed.kv_transfer import (
        get_kv_transfer_group,
        has_kv_transfer_group,
    )

    return get_kv_transfer_group() if has_kv_transfer_group() else None


def settle(llm: Any, block_size: int, name: str, timeout_s: float = 120.0) -> dict[str, int] | None:
    """After ``reset_caches``: one request shorter than a block carries kvtier's clear to its worker (it is
    sent with the next step's metadata), then this process waits for the worker's background work, which now
    includes deleting the previous round's files (a disk tier: ~1,400 unlinks, ~0.7 s on ext4 here), so that
    it does not run inside the timed round. Returns the blocks each tier holds then (None without a connector
    in this process: an engine core in its own process, whose clear then finishes in the background)."""
    generate_one(llm.llm_engine, name, sub_block_prompt(block_size), 1)
    connector = _local_connector()
    if connector is None or not hasattr(connector, "drain"):  # not kvtier's (e.g. LMCache's), or none here
        return None
    drain(connector, timeout_s)
    usage = (connector.snapshot() or {}).get("usage", {})
    return {tier: int(u["blocks"]) for tier, u in usage.items()}


def timed_round(llm: Any, workload: Workload, index: int, stats_file: str | None, block_size: int) -> dict[str, Any]:
    held = None
    if index > 0:
        reset_caches(llm)
        held = settle(llm, block_size, f"settle-{index}")
    time.sleep(0.2)
    out: dict[str, Any] = {"kvtier_before": read_stats(stats_file), "loadavg_before": os.getloadavg()}
    if held is not None:
        out["kvtier_blocks_at_start"] = held  # what kvtier's tiers held when the round began (none: cleared)
    begin = time.perf_counter()
    out["requests"], out["queue"] = replay(llm.llm_engine, workload)
    out["wall_s"] = round(time.perf_counter() - begin, 3)
    out["loadavg_after"] = os.getloadavg()
    time.sleep(0.5)  # the last saves were made many steps ago; the worker wrote its counters after each step
    out["kvtier_after"] = read_stats(stats_file)
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    rss = PeakRss()
    start = time.perf_counter()
    import vllm  # noqa: F401 - timed apart from the engine start: it is most of the start-up on a small CPU

    imported = time.perf_counter()
    llm = make_engine(spec)
    result: dict[str, Any] = {"name": spec["name"], "import_s": round(imported - start, 2),
                              "startup_s": round(time.perf_counter() - imported, 2), "rounds": []}
    wait_for_startup_work()
    warm_up(llm.llm_engine, spec["engine"]["block_size"])
    stats_file = os.environ.get("KVTIER_STATS_FILE")
    workload = Workload.from_dict(spec["workload"])
    print("BENCH-READY", flush=True)
    for line in sys.stdin:  # EOF (the runner went away) ends the loop like "quit"
        command = line.strip()
        if command == "run":
            result["rounds"].append(timed_round(llm, workload, len(result["rounds"]), stats_file,
                                                spec["engine"]["block_size"]))
        elif command == "check":
            result["check_requests"] = check_pass(llm, workload)
        elif command == "quit":
            break
        print("BENCH-DONE", flush=True)
    llm.llm_engine.engine_core.shutdown()  # the worker drains its saves and writes its counters once more
    result["kvtier_final"] = read_stats(stats_file)
    result["peak_rss_bytes"] = rss.stop()
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
