"""The Status answer: what the daemon holds and did, gathered from the registry and the
loader in one place (the service only hands it out)."""

from __future__ import annotations

import os
import time

from tensorferry import __version__
from tensorferry.daemon.loader import Loader
from tensorferry.daemon.records import as_message
from tensorferry.daemon.registry import Registry
from tensorferry.v1 import tensorferry_pb2 as pb


def status_response(
    registry: Registry, loader: Loader, instance: str, started: float
) -> pb.StatusResponse:
    """``started``: when the service started (``time.monotonic``)."""
    shm = registry.sink.usage()
    backend, cuda = loader.backend, loader.cuda
    connections = backend.connections() if backend is not None else (0, 0)
    # Models adopted at start from the daemon before (daemon/adoption.py), still resident.
    adopted = [m.loaded.arena.size for m in registry.models if m.adopted and m.loaded]
    return pb.StatusResponse(
        version=__version__, instance_id=instance, pid=os.getpid(),
        uptime_seconds=time.monotonic() - started,
        models=[m.info() for m in registry.models],
        recent_loads=[as_message(r) for r in loader.recent],
        resident_bytes=shm.resident, recycled_bytes=shm.recycled,
        shm_budget_bytes=shm.budget, arenas=shm.arenas,
        store_connections_open=connections[0], store_connections_busy=connections[1],
        rings=cuda.ring_status() if cuda is not None else [],
        gpus=cuda.gpu_status() if cuda is not None else [],
        fetch_workers=backend.fetch_workers() if backend is not None else [],
        adopted_models=len(adopted), adopted_bytes=sum(adopted),
    )  # fmt: skip
