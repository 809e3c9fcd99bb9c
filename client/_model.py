"""`LoadedModel`: a lease's tensors, as the sync and the async client both hand them out."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from tensorferry.v1 import tensorferry_pb2 as pb

if TYPE_CHECKING:
    import torch

    from tensorferry.client._cuda import CudaTarget


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
        self,
        ready: pb.Ready,
        tensors: dict[str, torch.Tensor],
        lease_end: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._lease_end = lease_end
        self.model_id = ready.model_id
        self.lease_id = ready.lease_id
        self.total_bytes = ready.total_bytes
        self.attached = ready.attached
        self.seconds = ready.seconds
        self.files = list(ready.files)
        self.tensors = tensors

    @property
    def lease_end(self) -> str | None:
        """None while the lease is held; then why it ended: "released" (Release),
        "shutdown" (the daemon stopped), "closed" (this process ended it), "lost" (the
        connection to the daemon broke)."""
        return self._lease_end()

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
    ready: pb.Ready,
    target: CudaTarget | None,
    table: list[pb.TensorInfo],
    end_lease: Callable[[], None],
    lease_end: Callable[[], str | None],
) -> LoadedModel:
    """Map the ready event's grant and build the views; the lease ends if mapping fails.

    ``end_lease`` runs once the last view is gone, maybe on another thread (the garbage
    collector's); ``lease_end`` answers `LoadedModel.lease_end`.
    """
    from tensorferry.client._views import build_views

    flat = map_or_end(ready, target, end_lease)
    return LoadedModel(ready, build_views(flat, table), lease_end)


def map_or_end(
    grant: pb.Ready | pb.Arena, target: CudaTarget | None, end_lease: Callable[[], None],
    fd: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """The flat tensor over the granted arena (``fd``: its CPU segment, already open);
    ``end_lease`` runs when it and every view of it are gone, or at once if mapping fails."""
    # torch loads here, not at import: `tensorferry ls/status/evict` stay fast.
    from tensorferry.client._views import map_grant

    try:
        return map_grant(grant, target, end_lease, fd)
    except BaseException as exc:
        # Only a GPU grant can leave a mapping open; a CPU attach never loads the CUDA
        # module (5 ms in a fresh process).
        if grant.WhichOneof("grant") == "cuda_ipc":
            from tensorferry.client._cuda import MappingStillOpen

            if isinstance(exc, MappingStillOpen):
                raise  # the daemon must not free memory this process may still map
        end_lease()
        raise
