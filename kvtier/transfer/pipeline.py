"""Pipeline: two device streams and two device buffers, so that one stream fills a buffer while the other
drains the previous one (a bus copy of one layer group overlaps the gather or scatter kernels of the next).

Per item: ``fill()`` gives the next buffer and runs on the first stream once the second stream is done with
that buffer's previous item; ``drain()`` runs on the second stream once what ``fill`` queued has completed;
``next()`` closes the item. Events order the two streams; the host never waits. On CPU (a buffered copier in
tests) the streams are absent and everything runs in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Pipeline:
    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.first: torch.cuda.Stream | None = None
        self.second: torch.cuda.Stream | None = None  # the stream that finishes every item: fences go here
        if self.cuda:
            self.first = torch.cuda.Stream(device=device)
            self.second = torch.cuda.Stream(device=device)
            # Reused: a wait is enqueued right after each record, and CUDA waits for the record current then.
            self._filled = [torch.cuda.Event() for _ in range(2)]
            self._drained = [torch.cuda.Event() for _ in range(2)]
        self._item = 0

    @contextlib.contextmanager
    def fill(self) -> Iterator[torch.Tensor]:
        """The next buffer, on the first stream, after the second stream has drained it."""
        k = self._item % 2
        if self.first is None:
            yield self.buffers[k]
            return
        self.first.wait_event(self._drained[k])  # a no-op before the buffer's first use
        with self.on(self.first):
            yield self.buffers[k]
        self._filled[k].record(self.first)

    @contextlib.contextmanager
    def drain(self) -> Iterator[torch.Tensor]:
        """The buffer just filled, on the second stream, after the filling has completed."""
        k = self._item % 2
        if self.second is None:
            yield self.buffers[k]
            return
        self.second.wait_event(self._filled[k])
        with self.on(self.second):
            yield self.buffers[k]
        self._drained[k].record(self.second)

    def next(self) -> None:
        self._item += 1

    @contextlib.contextmanager
    def on(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        if stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            yield
