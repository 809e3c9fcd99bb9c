"""Worker side of GPU arenas: which GPU ``cuda:N`` is, and zero-copy tensors over a handle.

``cuda:N`` is in this process's numbering, which may differ from the daemon's (each has
its own CUDA_VISIBLE_DEVICES): the client sends the GPU's UUID with the request, and
checks that the grant names that GPU. Each arena is opened once per process, however many
loads share it. When the last view of the last load is gone, the garbage collector's
finalizer only queues the mapping: it may run on any thread at any moment, also while an
engine captures a CUDA graph, which a device synchronize (or an unmap) would invalidate.
Queued mappings are closed (a device synchronize, then cudaIpcCloseMemHandle) at points the
caller chose: ``close_released()`` (public as
``tensorferry.client.close_released_gpu_mappings``), which ``LoadedModel.close()``,
``Client.close()``, the integrations at the end of a load, and the next import call make.
Only then does the load's lease end: the daemon
frees an arena when no lease holds it, and freeing memory a worker still maps is undefined
behaviour. When the sync or the close fails (a sticky error: this process's CUDA context
is broken) the mapping may still be there, so the lease is kept until the process exits.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from tensorferry import env
from tensorferry.cuda import (
    IPC_HANDLE_BYTES,
    CudaApi,
    CudaError,
    cuda_ordinals,
    is_cuda_device,
    normalize_pci,
    real_api,
)
from tensorferry.errors import FailedPrecondition, InvalidArtifact, InvalidRequest
from tensorferry.v1 import tensorferry_pb2 as pb

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CudaTarget:
    """The GPUs a ``cuda`` device string names, as this worker sees them."""

    device: str
    api: CudaApi | None  # None: this worker sees no CUDA device
    ordinals: tuple[int, ...] = ()
    uuids: tuple[str, ...] = ()


_fakes: dict[tuple[str, ...], CudaApi] = {}


def cuda_api(explicit: CudaApi | None) -> CudaApi | None:
    """The CUDA API a worker uses: an explicit one, the fake named by
    $TENSORFERRY_FAKE_CUDA (tests), else cupy's (None without cupy or a GPU). One per
    process for the implicit ones: arenas are opened once per process and API."""
    if explicit is not None:
        return explicit
    fake = env.fake_cuda_devices()
    if fake:
        key = tuple(fake)
        if key not in _fakes:
            from tensorferry.cuda.fake import FakeCudaApi

            _fakes[key] = FakeCudaApi.from_uuids(fake)
        return _fakes[key]
    return real_api()


def resolve_target(
    device: str, explicit: CudaApi | None, *, importing: bool = True
) -> CudaTarget | None:
    """None for the CPU (and for strings the daemon will refuse as unsupported).
    ``importing``: the caller will map the arena (a load, not a preload)."""
    ordinals = cuda_ordinals(device) if is_cuda_device(device) else None
    if ordinals is None:
        return None
    api = cuda_api(explicit)
    if api is None:
        if importing:
            _needs_cupy(device)
        # No UUIDs: the daemon's numbering (and without CUDA of its own, it refuses).
        return CudaTarget(device, None)
    devices = api.devices()
    resolved = tuple(api.current_device() if o is None else o for o in ordinals)
    for ordinal in resolved:
        if ordinal >= len(devices):
            raise InvalidRequest(
                f"device {device!r}: this worker sees {len(devices)} CUDA devices "
                f"(cuda:0..cuda:{len(devices) - 1})"
            )
    return CudaTarget(device, api, resolved, tuple(devices[o].uuid for o in resolved))


def _needs_cupy(device: str) -> None:
    import torch

    if torch.cuda.is_available():
        raise FailedPrecondition(
            f"device {device!r}: torch sees CUDA here, but importing the daemon's GPU arenas "
            "needs cupy in the worker: pip install 'tensorferry[cuda]'"
        )


class _Mapping:
    """One opened IPC handle in this process, shared by every load of that arena."""

    def __init__(self, api: CudaApi, key: tuple[int, bytes], ordinal: int) -> None:
        self.api, self.key, self.ordinal = api, key, ordinal
        self.users = 0
        self.closed = False
        self.ptr = api.ipc_open(key[1], ordinal)
        try:
            where = api.pointer_device(self.ptr)
        except BaseException:
            api.ipc_close(self.ptr, ordinal)
            raise
        if where != ordinal:
            # The open succeeds for a GPU this process cannot see, as a peer mapping.
            api.ipc_close(self.ptr, ordinal)
            raise FailedPrecondition(
                f"the arena mapped as memory of device {where}, not cuda:{ordinal}: CUDA "
                "reached it across devices; run the worker on the GPU the daemon placed it on"
            )

    def close(self) -> bool:
        """Whether the mapping is closed; False: it may still be mapped."""
        try:
            self.api.device_synchronize(self.ordinal)  # no queued kernel may still read it
            self.api.ipc_close(self.ptr, self.ordinal)
        except CudaError as exc:
            log.error(
                "closing an imported arena on cuda:%d failed: %s; this worker keeps its lease "
                "(the daemon must not free memory still mapped here) until the process exits",
                self.ordinal, exc,
            )  # fmt: skip
            return False
        return True


# Reentrant: a garbage collection inside the lock may run a finalizer that takes it.
_lock = threading.RLock()
_open: dict[tuple[int, bytes], _Mapping] = {}
#: Mappings whose last view is gone, with the lease ends that wait for their close.
_released: list[tuple[_Mapping, Callable[[], None]]] = []


def _take_released(
    which: Callable[[_Mapping], bool],
) -> list[tuple[_Mapping, Callable[[], None]]]:
    """Remove the queued entries of the mappings ``which`` selects, in place (under
    ``_lock``): a collection during the scan may run ``_last_view``, which appends (the
    lock is reentrant), and rebuilding the list would drop that entry and its lease end."""
    taken: list[tuple[_Mapping, Callable[[], None]]] = []
    i = 0
    while i < len(_released):
        entry = _released[i]
        if which(entry[0]):
            del _released[i]
            taken.append(entry)
        else:
            i += 1
    return taken


def _acquire(api: CudaApi, handle: bytes, ordinal: int) -> _Mapping:
    key = (id(api), handle)
    with _lock:
        mapping = _open.get(key)
        if mapping is not None:
            mapping.users += 1  # first: a finalizer running now cannot close it any more
            if not mapping.closed:
                # Maybe queued for a close: in use again by this load, whose lease covers
                # the arena, so the leases that waited for the close may end.
                ends = [end for _, end in _take_released(lambda m: m is mapping)]
            else:
                mapping.users -= 1
                mapping = None
        if mapping is None:
            mapping = _Mapping(api, key, ordinal)
            mapping.users = 1
            _open[key] = mapping
            ends = []
    for end in ends:
        end()
    return mapping


def close_released() -> int:
    """Close the mappings whose last view is gone (a device synchronize per mapping, then
    cudaIpcCloseMemHandle) and end the leases that waited for them; how many were closed.

    Call it where a device synchronize is safe: after a load, never inside a CUDA graph
    capture. A garbage-collector finalizer never does this work (see the module's doc)."""
    with _lock:
        due = _take_released(lambda m: m.users == 0 and not m.closed)
        for mapping, _ in due:
            mapping.closed = True
            if _open.get(mapping.key) is mapping:
                del _open[mapping.key]
    for mapping, end in due:
        if mapping.close():
            end()
    return len(due)


def _drop(mapping: _Mapping) -> bool:
    """False when this was the last user and closing the mapping failed: whoever holds
    the lease must keep it."""
    with _lock:
        mapping.users -= 1
        if mapping.users or mapping.closed:
            return True  # another load's lease still holds the arena (or it is closed)
        mapping.closed = True
        if _open.get(mapping.key) is mapping:
            del _open[mapping.key]
    return mapping.close()


def _last_view(mapping: _Mapping, on_last_view: Callable[[], None]) -> None:
    # A finalizer: no CUDA call here (see the module's doc). The last user's lease ends
    # once ``close_released`` has closed the mapping; another user's lease ends now.
    with _lock:
        mapping.users -= 1
        last = mapping.users == 0 and not mapping.closed
        if last:
            _released.append((mapping, on_last_view))
    if not last:
        on_last_view()


class MappingStillOpen(FailedPrecondition):
    """The arena could not be unmapped after a failure: the caller keeps the lease."""


class _ArenaOwner:
    """What one load's flat tensor keeps alive; its finalizer ends that load's lease."""


def import_arena(
    grant: pb.CudaIpcGrant, target: CudaTarget | None, on_last_view: Callable[[], None]
) -> torch.Tensor:
    """A flat uint8 CUDA tensor over the arena; ``on_last_view`` runs when it and every
    view of it are gone (after the mapping was closed, if this was its last user)."""
    if target is None or target.api is None:
        raise FailedPrecondition(
            f"the daemon placed the model on {grant.gpu_uuid}, but this worker sees no CUDA "
            "device; GPU arenas need a GPU and cupy in the worker (pip install "
            "'tensorferry[cuda]')"
        )
    api, ordinal, want = target.api, target.ordinals[0], target.uuids[0]
    if grant.gpu_uuid.lower() != want.lower():
        raise FailedPrecondition(
            f"the daemon placed the arena on {grant.gpu_uuid}, but {target.device} of this "
            f"worker is {want}"
        )
    local = api.devices()[ordinal]
    if grant.pci_bus_id and normalize_pci(grant.pci_bus_id) != local.pci_bus_id:
        raise FailedPrecondition(
            f"{want} is PCI {local.pci_bus_id} here but {grant.pci_bus_id} to the daemon: "
            "the two processes disagree about this GPU"
        )
    if len(grant.handle) != IPC_HANDLE_BYTES:
        raise InvalidArtifact(
            f"the daemon sent a {len(grant.handle)}-byte IPC handle ({IPC_HANDLE_BYTES} expected)"
        )
    try:
        mapping = _acquire(api, bytes(grant.handle), ordinal)
    except CudaError as exc:
        raise FailedPrecondition(f"opening the arena on {want} failed: {exc}") from exc
    # A load is a point where synchronizing is safe; after the acquire, so that a mapping
    # of this very arena queued for its close is taken up again instead of reopened.
    close_released()
    owner = _ArenaOwner()
    finalizer = weakref.finalize(owner, _last_view, mapping, on_last_view)
    try:
        return api.as_tensor(owner, mapping.ptr, grant.size, ordinal)
    except BaseException as exc:
        finalizer.detach()  # the caller ends the lease itself...
        if not _drop(mapping):  # ...unless the mapping may still be open
            raise MappingStillOpen(
                f"wrapping the arena on {want} failed ({exc}), and closing its mapping "
                "failed too: this worker keeps the lease until the process exits"
            ) from exc
        if isinstance(exc, CudaError):
            raise FailedPrecondition(f"wrapping the arena on {want} failed: {exc}") from exc
        raise
