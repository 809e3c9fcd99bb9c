"""CPU-bound work on the event loop, in steps: a generator yields between bounded batches
of work (a few milliseconds each) and returns its result.

Building and planning 200k tensors costs the loop about a second of Python; run in one go
it holds Status, lease calls and every other load for that long, and in a thread it holds
the GIL as long. In steps, the loop runs other callbacks between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")
Steps = Generator[None, None, T]


async def stepwise(steps: Steps[T]) -> T:
    """Run ``steps`` to its result, letting the loop run other work between steps."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: T = stop.value
            return result
        await asyncio.sleep(0)


def at_once(steps: Steps[T]) -> T:
    """Run ``steps`` to its result without yielding (callers off the event loop)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: T = stop.value
            return result
