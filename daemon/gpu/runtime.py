"""The daemon's CUDA side, set up once at start: API, devices, pinned ring, copy engine, sink.

``open_cuda`` yields None when CUDA is off or absent ("auto" without cupy or without a
visible GPU): the daemon then serves CPU loads only, and a ``cuda`` device is refused
with FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from tensorferry.cuda import CudaApi, DeviceInfo, real_api
from tensorferry.daemon.config.settings import ConfigError
from tensorferry.daemon.gpu.h2d import CopyEngine
from tensorferry.daemon.gpu.ring import PinnedRing
from tensorferry.daemon.gpu.settings import CudaSettings
from tensorferry.daemon.sinks.cuda import CudaSink

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class CudaRuntime:
    api: CudaApi
    devices: list[DeviceInfo]
    ring: PinnedRing
    engine: CopyEngine
    sink: CudaSink

    def device(self, gpu_uuid: str) -> DeviceInfo:
        found = self.api.device_by_uuid(gpu_uuid)
        assert found is not None, gpu_uuid
        return found


def _api(settings: CudaSettings) -> CudaApi | None:
    if settings.api == "off":
        return None
    if settings.api == "fake":
        from tensorferry.cuda.fake import FakeCudaApi

        fake = FakeCudaApi(list(settings.fake_devices), jitter=settings.fake_jitter)
        # Its device memory is files named after this context: tests find this daemon's.
        log.warning("FAKE CUDA (test double), device memory files %s*", fake.file_prefix)
        return fake
    api = real_api()
    if api is None and settings.api == "cupy":
        raise ConfigError(
            'cuda.api = "cupy", but cupy is not installed or sees no GPU: install '
            "'tensorferry[cuda]' and check the driver (nvidia-smi), or set api = \"auto\""
        )
    return api


@contextlib.asynccontextmanager
async def open_cuda(
    settings: CudaSettings, *, chunk_size: int, instance: str
) -> AsyncIterator[CudaRuntime | None]:
    """Everything CUDA for the daemon's life; released in reverse order on the way out."""
    api = _api(settings)
    if api is None:
        log.info("no CUDA device (cuda.api = %s): serving CPU arenas only", settings.api)
        yield None
        return
    try:
        devices = api.devices()
        ring = PinnedRing(api, settings.ring_slots, settings.slot_size or chunk_size)
        ring.open()
        try:
            engine = CopyEngine(api, devices, ring, settings.copy_streams)
            sink = CudaSink(api, reserve=settings.reserve, instance=instance)
            try:
                engine.start()
                log.info(
                    "CUDA (%s): %s", api.name,
                    ", ".join(f"cuda:{d.ordinal}={d.uuid} ({d.pci_bus_id})" for d in devices),
                )  # fmt: skip
                yield CudaRuntime(api, devices, ring, engine, sink)
            finally:
                engine.close()
                # The waiting threads reported their last completions to this loop:
                # let those callbacks return slots and settle arenas before freeing.
                for _ in range(3):
                    await asyncio.sleep(0)
                sink.close()
        finally:
            ring.close()
    finally:
        api.close()
