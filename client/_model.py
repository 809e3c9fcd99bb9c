"""`LoadedModel`: a lease's tensors, as the sync and the async client both hand them out."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from tensorferry.v1 import tensorferry_pb2 as pb

if TYPE_CHECKING:
    import os

    import torch

    from tensorferry.client._cuda import CudaTarget
    from tensorferry.client._lease import Lease


def close_released_gpu_mappings() -> int:
    """Close this process's GPU mappings whose last tensor view is gone, and so end their
    leases (the daemon may then free the arenas); how many were closed.

    Each close synchronizes its device, which a garbage-collector finalizer must never do
    (it may run inside a CUDA graph capture): the finalizer only queues the mapping, and
    the lease ends here, at ``LoadedModel.close()``, at the next load, or at
    ``Client.close()``. Call it where a device synchronize is safe, never during a capture.
    """
    cuda = sys.modules.get("tensorferry.client._cuda")
    # Never imported: this process has mapped no GPU arena (a CPU worker stays light).
    return 0 if cuda is None else int(cuda.close_released())


class LoadedModel:
    """A resident model's tensors, as zero-copy views of the daemon's arena.

    ``close()`` drops this object's references; the lease ends when the last view is
    gone, so a tensor kept past ``close()`` stays valid. For a GPU arena the garbage
    collector only queues the mapping's close (no device synchronize in a finalizer): the
    lease ends at the next explicit point, ``close()``, the next load,
    ``Client.close()`` or ``close_released_gpu_mappings()``.
    """

    def __init__(
        self, ready: pb.Ready, tensors: dict[str, torch.Tensor], lease: Lease | None = None
    ) -> None:
        self._lease = lease
        self._ids = (ready.model_id, ready.lease_id)
        self.total_bytes = ready.total_bytes
        self.attached = ready.attached
        self.seconds = ready.seconds
        self.files = list(ready.files)
        self.tensors = tensors

    @property
    def lease_end(self) -> str | None:
        """None while a lease is held; else why the last one ended: "released" (Release),
        "shutdown" (the daemon stopped), "closed" (this process ended it), "lost" (the
        connection to the daemon broke). After "shutdown" or "lost", a CPU lease is
        re-established when the daemon is back with the arena (None again)."""
        return None if self._lease is None else self._lease.end_reason()

    @property
    def lease_restores(self) -> int:
        """How many times the lease was re-established after a daemon restart."""
        return 0 if self._lease is None else self._lease.restores

    @property
    def model_id(self) -> str:
        """The daemon's id of the model (the restarted daemon's after a restore)."""
        return self._lease.model_id if self._lease is not None else self._ids[0]

    @property
    def lease_id(self) -> str:
        """The lease's id (the re-established one's after a restore)."""
        return self._lease.lease_id if self._lease is not None else self._ids[1]

    def close(self) -> None:
        self.tensors = {}
        close_released_gpu_mappings()  # GPU mappings whose last view just went

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LoadedModel {self.model_id} tensors={len(self.tensors)} bytes={self.total_bytes}>"


def attach_model(
    ready: pb.Ready, target: CudaTarget | None, table: list[pb.TensorInfo], lease: Lease
) -> LoadedModel:
    """Map the ready event's grant and build the views; the lease ends if mapping fails.

    ``lease.end`` runs once the last view is gone, maybe on another thread (the garbage
    collector's); the lease answers `LoadedModel.lease_end`.
    """
    from tensorferry.client._views import build_views

    flat = map_or_end(ready, target, lease.end, on_mapped=lease.mapped)
    views = build_views(flat, table)
    lease.ready(ready)
    return LoadedModel(ready, views, lease)


def map_or_end(
    grant: pb.Ready | pb.Arena, target: CudaTarget | None, end_lease: Callable[[], None],
    fd: int | None = None, on_mapped: Callable[[os.stat_result], None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """The flat tensor over the granted arena (``fd``: its CPU segment, already open);
    ``end_lease`` runs when it and every view of it are gone, or at once if mapping fails;
    ``on_mapped`` gets a CPU segment's fstat (the identity a restored lease must match)."""
    # torch loads here, not at import: `tensorferry ls/status/evict` stay fast.
    from tensorferry.client._views import map_grant

    try:
        return map_grant(grant, target, end_lease, fd, on_mapped)
    except BaseException as exc:
        # Only a GPU grant can leave a mapping open; a CPU attach never loads the CUDA
        # module (5 ms in a fresh process).
        if grant.WhichOneof("grant") == "cuda_ipc":
            from tensorferry.client._cuda import MappingStillOpen

            if isinstance(exc, MappingStillOpen):
                raise  # the daemon must not free memory this process may still map
        end_lease()
        raise
