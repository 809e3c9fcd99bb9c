"""Blocking work in a thread whose task may be cancelled while the thread still runs.

``asyncio.to_thread`` returns at once when its task is cancelled, but the thread goes on:
a ``preadv`` keeps writing into a buffer that the cancelled caller has already handed to
the next range (a hedge's spare, a GPU ring slot, a retry of the same range). A buffer is
reused only once nothing can still write into it, so ``run_to_end`` returns (or raises)
only after its thread has, and asks the thread to stop early through an event.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: How much a stoppable read does between looks at its stop event: a cancelled read
#: returns within one such step (milliseconds from the page cache, longer from a slow disk).
STEP = 4 << 20


async def run_to_end(
    fn: Callable[Concatenate[threading.Event, P], T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``fn(stop, *args, **kwargs)`` in a worker thread, as ``asyncio.to_thread`` runs it
    (the caller's context variables included).

    If the awaiting task is cancelled, ``stop`` is set and the task keeps waiting, however
    often it is cancelled meanwhile, until ``fn`` has returned; then the CancelledError is
    raised. ``fn`` should look at ``stop`` between steps of bounded length and return
    early once it is set: what it returns then is thrown away.
    """
    stop = threading.Event()
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, fn, stop, *args, **kwargs)
    future = asyncio.get_running_loop().run_in_executor(None, call)
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            # asyncio.wait never cancels what it waits for: the thread runs on.
            await asyncio.wait([future])
        except asyncio.CancelledError as exc:
            stop.set()
            cancelled = cancelled or exc
    if cancelled is not None:
        if not future.cancelled():
            future.exception()  # retrieved: nobody wants the result of a cancelled call
        raise cancelled
    return future.result()
