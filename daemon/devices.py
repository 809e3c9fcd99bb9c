"""Which device a request means: "cpu", or GPUs identified by UUID.

A worker's ``cuda:N`` is in the worker's numbering, which differs from the daemon's
whenever their CUDA_VISIBLE_DEVICES differ (containers, one GPU per worker). The client
therefore resolves its ``cuda:N`` to the GPU's UUID and sends it (``gpu_uuids``); the
daemon looks the UUID up among its own devices. A request without UUIDs (a raw gRPC
caller, a CLI on a host without cupy) means the daemon's numbering.

Resident models are keyed by the GPU's UUID, so workers that number the same GPU
differently share one arena.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensorferry.cuda import DeviceInfo, cuda_ordinals, is_cuda_device, normalize_uuid
from tensorferry.errors import FailedPrecondition, InvalidRequest

CPU = "cpu"


def check_device(device: str) -> str:
    """The device of a daemon without CUDA: "cpu", or the refusal of a CUDA device."""
    return resolve_devices(device, (), None, lease=False)[0]


def _unsupported(device: str) -> InvalidRequest:
    return InvalidRequest(f"device {device!r} is not supported: use 'cpu' or 'cuda:N'")


def resolve_devices(
    device: str, gpu_uuids: Sequence[str], gpus: Sequence[DeviceInfo] | None, *, lease: bool
) -> list[str]:
    """Model keys' devices for a request: ["cpu"], or GPU UUIDs as this daemon sees them.

    ``gpus`` is None when the daemon has no CUDA. Several GPUs ("cuda:0,cuda:1") are for
    Preload only: one fetch fills them all; a Load holds one arena.
    """
    if device in ("", CPU):
        if gpu_uuids:
            raise InvalidRequest("gpu_uuids name GPUs, but the device is 'cpu'")
        return [CPU]
    if not is_cuda_device(device):
        raise _unsupported(device)
    if gpus is None:
        raise FailedPrecondition(
            f"device {device!r}: no CUDA device is visible to the daemon; load with "
            "device='cpu' or run the daemon on a GPU host"
        )
    ordinals = cuda_ordinals(device)
    if ordinals is None:
        raise _unsupported(device)
    if lease and len(ordinals) > 1:
        raise InvalidRequest(
            f"device {device!r}: a Load holds one GPU; preload onto several GPUs (one fetch "
            "fills them all), then load each from its own worker"
        )
    keys = _by_uuid(device, ordinals, gpu_uuids, gpus) if gpu_uuids else _by_ordinal(ordinals, gpus)
    if len(set(keys)) != len(keys):
        raise InvalidRequest(f"device {device!r} names one GPU twice")
    return keys


def _seen(gpus: Sequence[DeviceInfo]) -> str:
    return ", ".join(f"{d.uuid} (its cuda:{d.ordinal})" for d in gpus)


def _by_uuid(
    device: str, ordinals: list[int | None], gpu_uuids: Sequence[str], gpus: Sequence[DeviceInfo]
) -> list[str]:
    if len(gpu_uuids) != len(ordinals):
        raise InvalidRequest(
            f"device {device!r} names {len(ordinals)} GPUs but the request carries "
            f"{len(gpu_uuids)} GPU UUIDs"
        )
    by_uuid = {d.uuid.lower(): d for d in gpus}
    keys: list[str] = []
    for ordinal, raw in zip(ordinals, gpu_uuids, strict=True):
        try:
            gpu_uuid = normalize_uuid(raw)
        except ValueError:
            raise InvalidRequest(f"{raw[:64]!r} is not a GPU UUID (GPU-xxxxxxxx-...)") from None
        found = by_uuid.get(gpu_uuid.lower())
        if found is None:
            name = "cuda" if ordinal is None else f"cuda:{ordinal}"
            raise FailedPrecondition(
                f"the worker's {name} is {gpu_uuid}, a GPU the daemon does not see (it sees "
                f"{_seen(gpus)}); give the daemon that GPU (CUDA_VISIBLE_DEVICES, the "
                "container's device list) or load onto a GPU it sees"
            )
        keys.append(found.uuid)
    return keys


def _by_ordinal(ordinals: list[int | None], gpus: Sequence[DeviceInfo]) -> list[str]:
    keys: list[str] = []
    for ordinal in ordinals:
        n = 0 if ordinal is None else ordinal
        if n >= len(gpus):
            raise FailedPrecondition(
                f"device 'cuda:{n}': the daemon sees {len(gpus)} CUDA devices ({_seen(gpus)}); "
                "the client library sends the GPU's UUID, a raw request numbers GPUs as the "
                "daemon does"
            )
        keys.append(gpus[n].uuid)
    return keys
