"""Streams and events of the fake CUDA API (``fake.py``): FIFO threads, ordered events.

A stream runs its operations in order on its own thread, after the caller returned; with
jitter each waits a random moment first, so different streams finish out of order. An event
completes when its stream reaches it, so after everything queued before it.
"""

from __future__ import annotations

import collections
import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator

from tensorferry.cuda.api import CudaError


class FakeStream:
    """A FIFO of operations run by one thread; ``held()`` stalls it (for tests)."""

    def __init__(self, ordinal: int, jitter: float, rng: random.Random) -> None:
        self.ordinal = ordinal
        self._jitter = jitter
        self._rng = rng
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._cv = threading.Condition()
        self._busy = self._held = self._closed = False
        # A daemon thread: a test that forgets close() must not hang the interpreter.
        self._thread = threading.Thread(
            target=self._run, name=f"fake-cuda-stream-{ordinal}", daemon=True
        )
        self._thread.start()

    def enqueue(self, op: Callable[[], None]) -> None:
        with self._cv:
            if self._closed:
                raise CudaError("cudaErrorContextIsDestroyed: context is destroyed")
            self._ops.append(op)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (self._held or not self._ops):
                    self._cv.wait()
                if not self._ops:
                    return
                op = self._ops.popleft()
                self._busy = True
            if self._jitter:
                time.sleep(self._rng.uniform(0, self._jitter))
            try:
                op()
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def synchronize(self) -> None:
        with self._cv:
            while self._ops or self._busy:
                self._cv.wait()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._cv:
            self._held = True
        try:
            yield
        finally:
            with self._cv:
                self._held = False
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed, self._held = True, False
            self._cv.notify_all()
        self._thread.join()


class FakeEvent:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._done.set()  # never recorded: complete, as cudaEventQuery says
        self._lock = threading.Lock()
        self._generation = 0

    def record(self, stream: FakeStream) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._done.clear()

        def complete() -> None:
            with self._lock:
                # A re-recorded event waits for its latest record only.
                if generation == self._generation:
                    self._done.set()

        stream.enqueue(complete)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
