"""JobRunner: a secondary tier's transfers on bounded thread pools, finished jobs collected by polling.

A job is a list of per-block tasks (each returns True when its block was moved). Loads and stores run on two
pools so a backlog of stores never delays a promotion that a request is waiting for. ``submit`` only queues;
``take_finished`` hands back the jobs whose every task has returned, in completion order; ``drain`` blocks
until nothing is in flight. A task that raises counts as a failed block (logged once per exception type), so
nothing escapes into the caller's thread. No lock is held while a task runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BlockTask = Callable[[], bool]


@dataclass
class Job:
    """One submitted job over ``keys``; ``done[i]`` says whether block ``i`` was moved (valid once finished)."""

    job_id: int
    is_load: bool
    owner: str  # the request it belongs to
    keys: Sequence[bytes]
    submitted: float = field(default_factory=time.monotonic)
    done: list[bool] = field(default_factory=list)
    seconds: float = 0.0
    _remaining: int = 0


class JobRunner:
    def __init__(self, load_threads: int, store_threads: int, name: str = "kvtier-offload") -> None:
        if load_threads < 1 or store_threads < 1:
            raise ValueError("load_threads and store_threads must be at least 1")
        self._pools = {True: ThreadPoolExecutor(load_threads, thread_name_prefix=f"{name}-load"),
                       False: ThreadPoolExecutor(store_threads, thread_name_prefix=f"{name}-store")}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._finished: list[Job] = []
        self._logged: set[type] = set()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, job: Job, tasks: Sequence[BlockTask]) -> None:
        """Queue ``tasks`` (one per key of ``job``, in order); returns at once."""
        if len(tasks) != len(job.keys):
            raise ValueError(f"job {job.job_id}: {len(tasks)} tasks for {len(job.keys)} keys")
        job.done = [False] * len(tasks)
        job._remaining = len(tasks)
        with self._lock:
            if self._closed:
                raise RuntimeError("JobRunner is shut down")
            self._in_flight += 1
            if not tasks:
                self._finish(job)
                return
        pool = self._pools[job.is_load]
        for index, task in enumerate(tasks):
            pool.submit(self._run, job, index, task)

    def take_finished(self) -> list[Job]:
        with self._lock:
            finished, self._finished = self._finished, []
        return finished

    def drain(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted job has finished; False if ``timeout_s`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)

    def shutdown(self) -> None:
        """Let running tasks end, drop queued ones (their jobs never finish), stop the threads."""
        with self._lock:
            self._closed = True
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- pool side ---------------------------------------------------------------------------------------
    def _run(self, job: Job, index: int, task: BlockTask) -> None:
        try:
            ok = bool(task())
        except Exception as exc:  # a bug or an unmapped client error: a failed block, never a dead thread
            ok = False
            self._log_unexpected(job, exc)
        with self._lock:
            job.done[index] = ok
            job._remaining -= 1
            if job._remaining == 0:
                self._finish(job)

    def _finish(self, job: Job) -> None:
        """Publish a job whose tasks all returned (lock held)."""
        job.seconds = time.monotonic() - job.submitted
        self._finished.append(job)
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.notify_all()

    def _log_unexpected(self, job: Job, exc: Exception) -> None:
        kind = "load" if job.is_load else "store"
        if type(exc) not in self._logged:
            self._logged.add(type(exc))
            log.error("kvtier offload: %s task of job %d raised %s: %s (block counted as failed; further "
                      "%s errors logged at debug level)", kind, job.job_id, type(exc).__name__, exc,
                      type(exc).__name__, exc_info=exc)
        else:
            log.debug("kvtier offload: %s task of job %d raised %r", kind, job.job_id, exc)
