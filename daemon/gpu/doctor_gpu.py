"""``tensorferry doctor``'s GPU checks: can the daemon use the GPUs the driver lists, and
what does a running daemon hold on each (a context only after a load asked for that GPU)."""

from __future__ import annotations

from collections.abc import Callable

from tensorferry.cuda import CudaApi, real_api
from tensorferry.cuda.driver import driver_gpus
from tensorferry.daemon.config.settings import Settings

Report = Callable[[str, str, str], None]


def check_cuda_api(
    settings: Settings, report: Report, *, driver_count: Callable[[], int] = driver_gpus,
    api: Callable[[], CudaApi | None] = real_api,
) -> None:  # fmt: skip
    """A GPU host whose daemon would serve CPU arenas only is a FAIL, never silent."""
    if settings.cuda.api not in ("auto", "cupy"):
        return
    gpus = driver_count()
    if not gpus:
        return
    found = api()
    if found is None:
        report("FAIL", f"CUDA: the NVIDIA driver lists {gpus} GPU(s) but cupy cannot use them: "
               "the daemon serves CPU arenas only",
               "pip install 'tensorferry[cuda]' (cupy-cuda12x or cupy-cuda13x, as "
               "nvidia-smi's CUDA version says); torch's CUDA build does not matter, it is "
               "never used")  # fmt: skip
        return
    report("ok", f"CUDA through {found.name}: {len(found.devices())} GPU(s) usable", "")


def check_daemon_gpus(settings: Settings, report: Report) -> None:
    """What the running daemon holds on each GPU (nothing: it has not loaded onto it)."""
    if not settings.socket.exists():
        return
    from tensorferry.client import Client

    try:
        with Client(str(settings.socket)) as client:
            status = client.status()
    except Exception as exc:
        # Broad on purpose: a stale socket, a daemon of another version, a refused peer;
        # each is worth a line, none stops the other checks.
        report("warn", f"daemon at {settings.socket}: what it holds on the GPUs is unknown "
               f"({type(exc).__name__}: {exc})", "check that `tensorferry status` answers "
               "(a stale socket, or no access to it)")  # fmt: skip
        return
    for g in status.gpus:
        report("ok", f"daemon on cuda:{g.ordinal} ({g.uuid}): CUDA context "
               f"{'yes' if g.context else 'no'}, arenas {g.arena_bytes / 2**30:.2f} GiB, "
               f"pinned ring {g.ring_bytes / 2**30:.2f} GiB", "")  # fmt: skip
