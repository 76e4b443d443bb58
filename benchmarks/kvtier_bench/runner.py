"""Runs each configuration in its own driver process (one vLLM engine each) and collects the results.

All engines are started first (a few at a time) and stay up, waiting for commands; then the timed rounds run
one configuration at a time, round-robin (round 1 of every configuration, then round 2, ..., the order rotated
each round), so a busy spell of a shared machine spreads over all configurations instead of hitting one; then
the correctness passes, one engine at a time as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kvtier_bench.configs import RunConfig
from kvtier_bench.procs import allocator_env


def cpu_list() -> str:
    """The cores this process may run on, as VLLM_CPU_OMP_THREADS_BIND wants them ("0-1", "0,2-3")."""
    cores = sorted(os.sched_getaffinity(0))
    ranges: list[str] = []
    start = prev = cores[0]
    for core in cores[1:] + [-2]:
        if core != prev + 1:
            ranges.append(f"{start}-{prev}" if prev > start else str(start))
            start = core
        prev = core
    return ",".join(ranges)


def driver_env(cfg: RunConfig, stats_file: Path | None, multiprocessing: bool,
               allocator: str = "kvtier") -> dict[str, str]:
    # The user's KVTIER_* overrides would silently change the compared layouts: drop them.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KVTIER_") or k in ("KVTIER_HOME", "KVTIER_LOG_LEVEL")}
    env.update(VLLM_CPU_OMP_THREADS_BIND=cpu_list(), VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocessing else "0",
               PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("GLIBC_TUNABLES", None)
    env.update(allocator_env(allocator))  # every engine alike: kvtier's worker would set them in its own only
    if stats_file is not None:
        env["KVTIER_STATS_FILE"] = str(stats_file)
    env.update(cfg.env)
    return env


@dataclass
class Driver:
    cfg: RunConfig
    dir: Path
    proc: subprocess.Popen[str]
    started: float
    ready: bool = False
    done: int = 0           # BENCH-DONE lines seen
    progress: tuple[int, int] = (0, 0)
    reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def result_file(self) -> Path:
        return self.dir / "result.json"

    @property
    def log_file(self) -> Path:
        return self.dir / "engine.log"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the driver and everything it started (its own process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: finish() reports why


def launch(cfg: RunConfig, spec: dict[str, Any], run_dir: Path, multiprocessing: bool,
           allocator: str = "kvtier") -> Driver:
    cdir = run_dir / cfg.name
    cdir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "stats.json"):
        (cdir / stale).unlink(missing_ok=True)
    (cdir / "spec.json").write_text(json.dumps(spec))
    env = driver_env(cfg, cdir / "stats.json" if cfg.uses_kvtier else None, multiprocessing, allocator)
    with open(cdir / "engine.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kvtier_bench.driver", str(cdir / "spec.json"),
                                 str(cdir / "result.json")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env, start_new_session=True)
    drv = Driver(cfg, cdir, proc, time.monotonic())
    drv.reader = threading.Thread(target=_read_output, args=(drv,), daemon=True)
    drv.reader.start()
    return drv


def _read_output(drv: Driver) -> None:
    assert drv.proc.stdout is not None
    with open(drv.dir / "driver.out", "w") as out:
        for line in drv.proc.stdout:
            out.write(line)
            if line.startswith("BENCH-PROGRESS "):
                done, total = line.split()[1:3]
                drv.progress = (int(done), int(total))
            elif line.startswith("BENCH-READY"):
                drv.ready = True
            elif line.startswith("BENCH-DONE"):
                drv.done += 1


T = TypeVar("T")


def round_order(drivers: Sequence[T], index: int) -> list[T]:
    """The order of round ``index``: rotated by one each round, so no configuration always runs right after the
    same one (e.g. after vllm-prefix's CPU-bound recomputes) or always first."""
    if not drivers:
        return []
    shift = index % len(drivers)
    return [*drivers[shift:], *drivers[:shift]]


@contextlib.contextmanager
def alone(drv: Driver, drivers: list[Driver], pause: bool) -> Iterator[None]:
    """Run ``drv`` with every other engine stopped (SIGSTOP to its process group), so background work left
    from their own rounds (saves still landing, idle threads) takes nothing from the one being measured."""
    others = [d for d in drivers if d is not drv and d.alive] if pause else []
    for other in others:
        _signal(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            _signal(other, signal.SIGCONT)


def _signal(drv: Driver, sig: int) -> None:
    try:
        os.killpg(drv.proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_until(drivers: list[Driver], condition: Callable[[Driver], bool], deadline: float,
               tick: Callable[[], None] | None = None) -> None:
    """Until every live driver meets ``condition`` (a dead one no longer counts) or the deadline passes."""
    while time.monotonic() < deadline and any(d.alive and not condition(d) for d in drivers):
        if tick is not None:
            tick()
        time.sleep(0.2)
    if tick is not None:
        tick()


def command(drivers: list[Driver], text: str, timeout_s: float, tick: Callable[[], None] | None = None) -> None:
    """Send ``text`` to every live driver and wait for each one's BENCH-DONE."""
    targets = [d for d in drivers if d.alive and d.ready]
    expected = {id(d): d.done + 1 for d in targets}
    for drv in targets:
        drv.send(text)
    wait_until(targets, lambda d: d.done >= expected[id(d)], time.monotonic() + timeout_s, tick)
    for drv in targets:
        if drv.alive and drv.done < expected[id(drv)]:
            drv.kill()  # overran its time: finish() reports the timeout


def finish(drv: Driver, timeout_s: float = 120.0) -> dict[str, Any]:
    """Ask the driver to quit; return its result, or a failure with the root cause from its log."""
    drv.send("quit")
    try:
        drv.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        drv.kill()
    if drv.reader is not None:
        drv.reader.join(timeout=5)
    if drv.result_file.exists():
        return {"status": "ok", "raw": json.loads(drv.result_file.read_text())}
    if drv.proc.returncode in (-9, 137):
        cause = f"killed after {time.monotonic() - drv.started:.0f} s (timed out or out of memory)"
    else:
        cause = root_cause(drv.log_file.read_text(errors="replace"), drv.proc.returncode)
    status = "not supported here" if drv.cfg.expect_failure else "failed"
    return {"status": status, "error": cause}


_GENERIC = ("Engine core initialization failed", "See root cause above", "died unexpectedly")
_ERROR_LINE = re.compile(r"(?:^|[\])]:?\s)((?:[\w.]+\.)?\w*(?:Error|Exception)): (.+)$")


def root_cause(log: str, returncode: int | None) -> str:
    """The most specific exception line of a failed engine start (vLLM prints a generic one last)."""
    found: list[str] = []
    for line in log.splitlines():
        match = _ERROR_LINE.search(line.strip())
        if match and not any(g in line for g in _GENERIC):
            found.append(f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}")
    if found:
        worker = [f for f in found if "Worker failed with error" in f]
        text = worker[-1] if worker else found[-1]
        inner = re.search(r"Worker failed with error '(.+?)', please check", text)
        return inner.group(1) if inner else text[:400]
    return f"exited with code {returncode} (see the engine log)"
