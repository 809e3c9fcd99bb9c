"""The gate every RPC of the Loader service passes: admission by class, and error mapping.

Admission counts open calls per class, each class with its own [limits] key, so leases
filling theirs never lock operators out of Status, List, Release and Evict. Errors leave
every handler here as a status code through the one mapping in ``tensorferry.errors``,
keeping any trailing metadata the handler set (a lease's end reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from tensorferry.daemon.config.settings import Limits
from tensorferry.errors import ResourceExhausted, TensorferryError, to_status

log = logging.getLogger(__name__)
SERVICE = "/tensorferry.v1.Loader/"


class CallKind(enum.Enum):
    """Admission classes, each with its own [limits] key."""

    LEASE = "max_leases"
    TRANSFER = "max_transfer_calls"
    CONTROL = "max_control_calls"

    def limit(self, limits: Limits) -> int:
        return int(getattr(limits, self.value))

    def refusal(self, n: int, limit: int) -> str:
        key = f"([limits] {self.value} = {limit})"
        if self is CallKind.LEASE:
            return (
                f"{n} leases are open on this daemon, its limit {key}; each loaded model "
                "holds one until it is closed or released: release unused models or raise "
                "the limit"
            )
        if self is CallKind.TRANSFER:
            return (
                f"{n} Preload and GetFile calls are open on this daemon, its limit {key}; "
                "retry when one ends or raise the limit"
            )
        return (
            f"{n} control calls (Status, List, Release, Evict) are open on this daemon, its "
            f"limit {key}; retry in a moment or raise the limit"
        )


#: The class of each method; a method missing here would pass unadmitted, so tests check
#: that this covers the whole service.
KINDS: dict[str, CallKind] = {
    "Load": CallKind.LEASE,
    "Preload": CallKind.TRANSFER,
    "GetFile": CallKind.TRANSFER,
    "Release": CallKind.CONTROL,
    "List": CallKind.CONTROL,
    "Evict": CallKind.CONTROL,
    "Status": CallKind.CONTROL,
}


class Admission:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open_calls = dict.fromkeys(CallKind, 0)

    @contextlib.contextmanager
    def admitted(self, kind: CallKind) -> Iterator[None]:
        """Count the call in its class; refuse it, with the numbers, above that class's limit.

        (gRPC's own limit, set above the sum as a backstop, would refuse without the
        numbers and regardless of class.)
        """
        limit, n = kind.limit(self.limits), self.open_calls[kind]
        if n >= limit:
            raise ResourceExhausted(kind.refusal(n, limit))
        self.open_calls[kind] += 1
        try:
            yield
        finally:
            self.open_calls[kind] -= 1

    @property
    def backstop(self) -> int:
        """gRPC's maximum_concurrent_rpcs: above every class's limit (health checks too)."""
        return sum(kind.limit(self.limits) for kind in CallKind) + 16


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    code, details, trailers = to_status(exc)
    if not isinstance(exc, TensorferryError):
        log.exception("internal error", exc_info=exc)
    context.set_trailing_metadata(tuple(context.trailing_metadata() or ()) + trailers)
    await context.abort(code, details)


class OpenCalls:
    """Calls until their final status is sent (gRPC's done callback, after the status)."""

    def __init__(self) -> None:
        self._open: set[grpc.aio.ServicerContext[Any, Any]] = set()
        self._none = asyncio.Event()
        self._none.set()

    def track(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._open.add(context)
        self._none.clear()
        # grpc-stubs declare the callback a class of its own, not a callable's protocol.
        context.add_done_callback(self._done)  # type: ignore[arg-type]

    def _done(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._open.discard(context)
        if not self._open:
            self._none.set()

    async def ended(self, timeout: float) -> None:
        """Until every tracked call has sent its status, or ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._none.wait()


class Gate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each Loader handler in admission and error mapping (health checks pass by)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(SERVICE):
            return handler
        kind = KINDS[method.removeprefix(SERVICE)]
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, kind), **codec
            )
        behaviour: Any = handler.unary_stream
        assert behaviour is not None, f"{method}: only unary and server-streaming methods"
        # grpc.aio tells a streaming handler's two forms apart by this: keep the form.
        if inspect.isasyncgenfunction(behaviour):
            return grpc.unary_stream_rpc_method_handler(self._stream(behaviour, kind), **codec)
        return grpc.unary_stream_rpc_method_handler(self._unary(behaviour, kind), **codec)

    def _unary(self, behaviour: Callable[..., Awaitable[Any]], kind: CallKind) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                with self.admission.admitted(kind):
                    return await behaviour(request, context)
            except Exception as exc:
                await abort(context, exc)

        return call

    def _stream(self, behaviour: Callable[..., AsyncIterator[Any]], kind: CallKind) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                with self.admission.admitted(kind):
                    async for message in behaviour(request, context):
                        yield message
            except Exception as exc:
                await abort(context, exc)

        return call
