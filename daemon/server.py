"""The daemon process: socket and lock, arenas, S3 client, gRPC server, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorferry.daemon import systemd
from tensorferry.daemon.adoption import adopt_claimed
from tensorferry.daemon.config.settings import ConfigError, Settings, TcpSettings
from tensorferry.daemon.fetch.link import link_rate
from tensorferry.daemon.fetch.workers import worker_count
from tensorferry.daemon.gpu.runtime import open_cuda
from tensorferry.daemon.loader import Loader
from tensorferry.daemon.metrics import Metrics
from tensorferry.daemon.model import Model, State
from tensorferry.daemon.records import RecentLoads
from tensorferry.daemon.registry import Registry
from tensorferry.daemon.rpc.admission import Admission, Gate
from tensorferry.daemon.rpc.peers import serve_peers
from tensorferry.daemon.rpc.service import LoaderService
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink, ShmArena
from tensorferry.daemon.store.base import StoreEvents
from tensorferry.daemon.store.cache import DiskTier
from tensorferry.daemon.store.s3 import S3Backend
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "tensorferry.v1.Loader"
SHUTDOWN_GRACE = 5.0


class AlreadyRunning(RuntimeError):
    pass


@contextlib.asynccontextmanager
async def hold_socket_lock(socket: Path, keep: bool = False) -> AsyncIterator[None]:
    """An flock beside the socket: grpc would silently steal a live daemon's socket path.

    With ``keep`` the lock file stays at exit: it tells a daemon of another socket that
    this one may start again, so its sealed arenas are left for it (``adopt_shm``).
    """
    socket.parent.mkdir(parents=True, exist_ok=True)
    lock_path = socket.with_name(socket.name + ".lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another tensorferry daemon (pid {owner}) is already serving {socket}; stop "
                "it first or give this one another --socket"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(lock_path), os.fstat(fd)):
                break
        # Its owner unlinked it on the way out after we opened it: a daemon starting now
        # locks a new file at that path, so this one would guard nothing.
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()  # left by a daemon that was killed; its lock is free
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
        os.close(fd)


async def run_daemon(
    settings: Settings,
    stop: asyncio.Event,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve until ``stop`` is set; every resource is released on the way out."""
    if not settings.allow and not settings.allow_any_source:
        raise ConfigError(
            "no source allowlist configured: the daemon acts with this host's credentials "
            "for any local process that reaches its socket. Add [sources] allow = "
            '["s3://bucket/prefix/", "/models"] to the config, or pass --allow-any-source'
        )
    if settings.allow_any_source:
        log.warning("serving ANY source the daemon's credentials can read (--allow-any-source)")
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(hold_socket_lock(settings.socket, settings.adopt_arenas))
        # Under systemd the sealed arenas' descriptors are kept by its descriptor store too
        # (with [memory] adopt = false, what it kept is dropped from it at start).
        fd_store = systemd.FdStore()
        sink = await stack.enter_async_context(
            CpuShmSink(settings.shm_dir, mode=settings.socket_mode & 0o440,
                       budget=settings.shm_budget, group=settings.group_id(),
                       recycle_budget=settings.recycle_bytes,
                       warm_bytes=settings.limits.warm_bytes, socket=str(settings.socket),
                       adopt=settings.adopt_arenas, fd_store=fd_store)
        )  # fmt: skip
        # Before the task group: loads end (and their copies complete) before CUDA goes.
        cuda = await stack.enter_async_context(
            open_cuda(
                settings.cuda,
                chunk_size=settings.s3.chunk_size,
                instance=sink.instance,
                target_rate=settings.s3.target_rate,
            )
        )
        events = StoreEvents()
        backend = await _open_s3(stack, settings, events)
        tasks = await stack.enter_async_context(asyncio.TaskGroup())
        tier = None
        if settings.cache_dir is not None:
            tier = DiskTier(settings.cache_dir, settings.cache_budget)
        recent = RecentLoads()
        loader = Loader(settings, sink, cuda, backend, tier, recent)
        limits = settings.limits
        registry = Registry(
            sink, tasks, loader, limits.max_concurrent_loads, limits.max_loads_per_client,
            cuda=cuda,
        )  # fmt: skip
        # Sealed arenas of ready models stay for the next daemon ([memory] adopt).
        stack.callback(registry.close, settings.adopt_arenas)
        # Before anyone is served: a request never refetches a model about to be adopted.
        await adopt_claimed(loader, registry, settings)
        if settings.metrics_listen:
            workers = backend.fetch_workers if backend is not None else list
            metrics = Metrics(registry, workers)
            recent.subscribe(metrics.observe)
            events.subscribe(
                get_seconds=metrics.get_seconds.observe, fallback=metrics.proxy_fallbacks.inc
            )
            metrics.serve(settings.metrics_listen)
            stack.callback(metrics.close)
        stack.callback(registry.cancel_loads)  # runs before close: loads stop, then arenas go
        # Before the gRPC socket appears: a client that finds it also finds the peer socket.
        peers = await stack.enter_async_context(
            serve_peers(settings.socket, settings.socket_mode, settings.group_id())
        )
        service = LoaderService(settings, registry, loader, sink.instance, peers)
        admission = Admission(limits)
        server = grpc.aio.server(
            interceptors=[Gate(admission)],
            options=[
                ("grpc.max_receive_message_length", limits.max_request_bytes),
                ("grpc.max_send_message_length", 64 << 20),
            ],
            # The Gate answers first, per class and with the numbers.
            maximum_concurrent_rpcs=admission.backstop,
        )
        pb_grpc.add_LoaderServicer_to_server(service, server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        target = f"unix:{settings.socket}"
        if server.add_insecure_port(target) == 0:
            raise ConfigError(f"could not bind {target}")
        if settings.tcp is not None:
            _add_tls_port(server, settings.tcp)
        await server.start()
        # grpc creates the socket under the process umask; set the mode we document.
        os.chmod(settings.socket, settings.socket_mode)
        os.chown(settings.socket, -1, settings.group_id())
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "tensorferry daemon %s serving on %s (arena instance %s, %d parallel GETs to "
            "start, sized for a link of %s)", os.getpid(), settings.socket, sink.instance,
            settings.s3.concurrency, loader.link.describe(),
        )  # fmt: skip
        on_ready()
        systemd.notify(f"READY=1\nSTATUS=serving on {settings.socket}")
        tasks.create_task(systemd.watchdog(stop))
        # After READY: a fresh daemon's first load finds the memory populated, or takes
        # what is so far. Stopped before the task group waits for it at exit.
        tasks.create_task(sink.pool.fill())
        stack.callback(sink.pool.stop)
        for uri in settings.preload:
            tasks.create_task(_preload(service, uri))
        try:
            await stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            await _drain(service, settings.shutdown_grace)
            log.info("stopping: ending leases and in-flight calls")
            deadline = time.monotonic() + SHUTDOWN_GRACE
            # Every Load stream's final status first, then gRPC's GOAWAY (see end_calls).
            await service.end_calls(SHUTDOWN_GRACE)
            await health.enter_graceful_shutdown()
            await server.stop(max(deadline - time.monotonic(), 0.1))


async def _open_s3(
    stack: contextlib.AsyncExitStack, settings: Settings, events: StoreEvents
) -> S3Backend | None:
    """The S3 client, or None where aiobotocore is not installed: GPU images often lack it
    and reach no index, and a daemon serving local directories needs none."""
    try:
        import aiobotocore.session  # noqa: F401
        import botocore.exceptions  # noqa: F401
    except ImportError as exc:
        log.warning(
            "S3 support is not installed (%s): serving local directories only; pip install "
            "'tensorferry[daemon]' to read s3:// sources", exc,
        )  # fmt: skip
        return None
    workers = worker_count(
        settings.fetch_workers, settings.fetch_worker_mode,
        link_rate(settings.s3.target_rate).bps, len(os.sched_getaffinity(0)),
    )  # fmt: skip
    mode = settings.fetch_worker_mode
    backend = S3Backend(settings.s3, events, workers=workers, worker_mode=mode)
    return await stack.enter_async_context(backend)


async def _drain(service: LoaderService, grace: float) -> None:
    """Refuse new loads; give workers up to ``grace`` seconds to end their leases.

    CUDA arenas die with the exporting process, so a GPU worker must reload after a daemon
    restart; the grace lets a rolling restart first move traffic away. Sealed CPU arenas
    stay for the next daemon (``[memory] adopt``), and their workers' leases come back.
    """
    service.draining.set()
    deadline = time.monotonic() + grace
    keep = service.settings.adopt_arenas
    # Polled: shutdown is rare and 50 ms is fine; an event would thread through the registry.
    while time.monotonic() < deadline and any(  # noqa: ASYNC110
        m.leases and not (keep and _outlives(m)) for m in service.registry.models
    ):
        await asyncio.sleep(0.05)


def _outlives(model: Model) -> bool:
    """A ready model whose arena is sealed: the next daemon adopts it, so its workers keep
    their tensors and get their leases back; no need to wait for them."""
    arena = model.loaded.arena if model.loaded is not None else None
    return model.state is State.READY and isinstance(arena, ShmArena) and arena.sealed


async def _preload(service: LoaderService, uri: str) -> None:
    """A preload from the config: logged, never fatal (READY does not wait for it)."""
    try:
        async for _ in service.preload_events(uri):
            pass
        log.info("preloaded %s", uri)
    except Exception as exc:
        log.error("preload of %s failed: %s", uri, exc)


def _add_tls_port(server: grpc.aio.Server, tcp: TcpSettings) -> None:
    """gRPC over TCP, TLS only: a plaintext client's handshake fails."""
    ca = tcp.client_ca.read_bytes() if tcp.client_ca else None
    credentials = grpc.ssl_server_credentials(
        [(tcp.key.read_bytes(), tcp.cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )
    if server.add_secure_port(tcp.listen, credentials) == 0:
        raise ConfigError(f"tcp.listen: could not bind {tcp.listen}")
    log.info("also serving gRPC over TLS on %s (client certificates %s)", tcp.listen,
             "required" if ca else "not required")  # fmt: skip


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
