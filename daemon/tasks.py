"""Structured-concurrency helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tensorferry.errors import TensorferryError


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The most useful member of a TaskGroup's exception group: ours before others."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for exc in g.exceptions:
            walk(exc) if isinstance(exc, BaseExceptionGroup) else leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, TensorferryError):
            return exc
    return leaves[0]


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """A TaskGroup that re-raises its first error alone, so callers see our error types."""
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
    except BaseExceptionGroup as group:
        raise first_error(group) from None
