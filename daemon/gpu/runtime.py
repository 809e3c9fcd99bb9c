"""The daemon's CUDA side: API, devices, pinned rings, copy engine, sink.

At start only the devices are listed (no CUDA context: a daemon serving CPU arenas holds no
GPU memory, and GPUs in EXCLUSIVE_PROCESS mode stay free for the engines). A device's
context, streams and events, and the pinned ring of its NUMA node, are opened at the first
load onto it (``CudaRuntime.open_devices``), once however many loads ask at the same time.

``open_cuda`` yields None when CUDA is off or absent ("auto" without cupy or without a
visible GPU): the daemon then serves CPU loads only, and a ``cuda`` device is refused
with FAILED_PRECONDITION. Where the driver sees GPUs but cupy cannot use them, it says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from tensorferry.cuda import CudaApi, CudaError, DeviceInfo, real_api
from tensorferry.cuda.driver import driver_gpus
from tensorferry.daemon.config.settings import ConfigError
from tensorferry.daemon.fetch.link import link_rate
from tensorferry.daemon.gpu import numa, sizing
from tensorferry.daemon.gpu.h2d import CopyEngine
from tensorferry.daemon.gpu.ring import PinnedRing
from tensorferry.daemon.gpu.rings import RingSet, plan_rings
from tensorferry.daemon.gpu.settings import CudaSettings
from tensorferry.daemon.sinks.cuda import CudaSink
from tensorferry.errors import InternalError
from tensorferry.v1 import tensorferry_pb2 as pb

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class CudaRuntime:
    api: CudaApi
    devices: list[DeviceInfo]
    rings: RingSet
    engine: CopyEngine
    sink: CudaSink
    #: Devices being opened: every load that asks meanwhile waits for the same opening.
    _opening: dict[int, asyncio.Future[None]] = dataclasses.field(default_factory=dict)
    #: Two devices of one NUMA node may open at once; their ring is pinned once.
    _pin_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def ring(self) -> PinnedRing:
        """The first ring: the only one unless GPUs sit on several NUMA nodes."""
        return self.rings.rings[0]

    def ring_status(self) -> list[pb.RingInfo]:
        rings = self.rings
        return [
            pb.RingInfo(
                numa_node=r.node, slots=r.slots, slot_bytes=r.slot_size, free_slots=r.free,
                slots_taken=r.taken, sizing=f"{rings.size.why}; {rings.layout}",
                gpu_uuids=[d.uuid for d in self.devices if rings.ring_of(d) is r],
                pinned=r.is_open,
            )
            for r in rings
        ]  # fmt: skip

    def gpu_status(self) -> list[pb.GpuInfo]:
        """What the daemon holds on each GPU; asks CUDA nothing that would create a context."""
        out = []
        for d in self.devices:
            opened = self.engine.opened(d.ordinal)
            try:
                context = self.api.context_active(d.ordinal)
            except CudaError:
                context = None
            ring = self.rings.ring_of(d)
            out.append(pb.GpuInfo(
                ordinal=d.ordinal, uuid=d.uuid, pci_bus_id=d.pci_bus_id,
                context=opened if context is None else context, opened=opened,
                arena_bytes=self.sink.used_on(d.ordinal),
                ring_bytes=ring.size if opened and ring.is_open else 0,
            ))  # fmt: skip
        return out

    def device(self, gpu_uuid: str) -> DeviceInfo:
        found = self.api.device_by_uuid(gpu_uuid)
        assert found is not None, gpu_uuid
        return found

    async def open_devices(self, targets: Sequence[DeviceInfo]) -> None:
        """Open each target (context, streams, events, its node's ring) unless it is
        open; raises InternalError when CUDA fails (the next load tries again)."""
        for device in targets:
            if not self.engine.opened(device.ordinal):
                await self._opened(device)
            ring = self.rings.ring_of(device)
            # Here, on the loop (its free queue is an asyncio queue), by whichever load
            # comes first: the one that waited for the opening may have been cancelled.
            if ring.pinned and not ring.is_open:
                ring.hand_out()

    async def _opened(self, device: DeviceInfo) -> None:
        pending = self._opening.get(device.ordinal)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(None, self._open, device)
            self._opening[device.ordinal] = pending
            # Forgotten when it ends, whoever still waits: a failed opening whose waiters
            # were all cancelled must not answer the next load with its stale error.
            pending.add_done_callback(functools.partial(self._opening_done, device.ordinal))
        try:
            # Shielded: a cancelled load leaves the opening to finish for the others.
            await asyncio.shield(pending)
        except Exception as exc:
            raise InternalError(f"CUDA failed to open cuda:{device.ordinal} ({device.uuid}): "
                                f"{_describe(exc)}") from exc  # fmt: skip

    def _opening_done(self, ordinal: int, done: asyncio.Future[None]) -> None:
        if self._opening.get(ordinal) is done:
            del self._opening[ordinal]
        if not done.cancelled() and (exc := done.exception()) is not None:
            # Retrieved here, so that asyncio never reports it as lost; the waiters (if
            # any are left) raise it.
            log.error("opening cuda:%d failed: %s", ordinal, _describe(exc))

    def _open(self, device: DeviceInfo) -> None:
        ring = self.rings.ring_of(device)
        with self._pin_lock:
            if not ring.pinned:
                ring.pin(ordinal=device.ordinal)
        self.engine.open_device(device)
        log.info("CUDA opened cuda:%d (%s): context, %d copy streams%s", device.ordinal,
                 device.uuid, len(self.engine.lanes(device.ordinal)),
                 f", pinned ring of {ring.size >> 20} MiB" if ring.pinned else "")  # fmt: skip

    async def settle_openings(self) -> None:
        """Wait for openings still running (daemon exit), whatever their outcome."""
        pending = list(self._opening.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    # A CUDA error's message starts with its CUDA name; anything else says its type.
    return str(exc) if isinstance(exc, (CudaError, OSError)) else f"{type(exc).__name__}: {exc}"


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
    if api is None and (gpus := driver_gpus()):
        log.warning(
            "the NVIDIA driver lists %d GPU(s) but cupy cannot use them (not installed, or "
            "built for another CUDA; torch is never asked): serving CPU arenas only. Install "
            "'tensorferry[cuda]' (cupy-cuda12x or -13x, as nvidia-smi's CUDA version) and "
            "run `tensorferry doctor`", gpus,
        )  # fmt: skip
    return api


@contextlib.asynccontextmanager
async def open_cuda(
    settings: CudaSettings,
    *,
    chunk_size: int,
    instance: str,
    target_rate: int = 0,
    node_root: Path = numa.NODE_ROOT,
) -> AsyncIterator[CudaRuntime | None]:
    """Everything CUDA for the daemon's life; released in reverse order on the way out.

    ``target_rate``: ``[s3] target_rate``, which with the NIC sizes an "auto" ring."""
    api = _api(settings)
    if api is None:
        log.info("no CUDA device (cuda.api = %s): serving CPU arenas only", settings.api)
        yield None
        return
    try:
        devices = api.devices()
        rings = plan_rings(
            api, devices, settings, slot_size=settings.slot_size or chunk_size,
            link=link_rate(target_rate), total_memory=sizing.mem_total(), node_root=node_root,
        )  # fmt: skip
        try:
            # No device yet: each opens at its first load.
            engine = CopyEngine(api, [], rings.rings, settings.copy_streams)
            sink = CudaSink(api, reserve=settings.reserve, instance=instance)
            runtime = CudaRuntime(api, devices, rings, engine, sink)
            try:
                engine.start()
                log.info(
                    "CUDA (%s), each opened at its first load: %s", api.name,
                    ", ".join(f"cuda:{d.ordinal}={d.uuid} ({d.pci_bus_id})" for d in devices),
                )  # fmt: skip
                yield runtime
            finally:
                await runtime.settle_openings()
                engine.close()
                # The waiting threads reported their last completions to this loop:
                # let those callbacks return slots and settle arenas before freeing.
                for _ in range(3):
                    await asyncio.sleep(0)
                sink.close()
        finally:
            rings.close()
    finally:
        api.close()
