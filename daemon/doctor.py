"""`tensorferry doctor`: check a host the way the daemon will use it, and say what to fix.

Each check prints one line, ok / warn / FAIL, with the fix for anything not ok. The exit
status is 1 when a check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from tensorferry.daemon.config.settings import Settings
from tensorferry.daemon.fetch.link import SYS_NET, link_rate
from tensorferry.daemon.sinks.cpu_shm import mem_available

Report = Callable[[str, str, str], None]  # level, what, fix


def check_memlock(report: Report) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        report("ok", "memlock limit: unlimited", "")
    else:
        report("warn", f"memlock limit: {soft} bytes", "GPU hosts pin the ring buffers: set "
               "LimitMEMLOCK=infinity (systemd) or `ulimit -l unlimited`")  # fmt: skip


def check_shm(settings: Settings, report: Report) -> None:
    try:
        st = os.statvfs(settings.shm_dir)
    except OSError as exc:
        report("FAIL", f"{settings.shm_dir}: {exc}", "mount a tmpfs there (containers: "
               "--shm-size or an emptyDir with medium Memory, or hostIPC)")  # fmt: skip
        return
    size, avail = st.f_blocks * st.f_frsize, mem_available()
    what = f"{settings.shm_dir}: {size / 2**30:.1f} GiB tmpfs, MemAvailable {avail / 2**30:.1f} GiB"
    if settings.shm_budget and settings.shm_budget > size:
        report("warn", what, f"[memory] shm_budget ({settings.shm_budget}) exceeds the tmpfs size")
    elif size < 1 << 30:
        report("warn", what, "a tmpfs under 1 GiB holds only small models; enlarge it")
    else:
        report("ok", what, "")


def check_gpus(report: Report) -> None:
    if shutil.which("nvidia-smi") is None:
        report("ok", "GPUs: none visible (CPU arenas only)", "")
        return
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        report("FAIL", f"GPUs: nvidia-smi failed: {exc}", "check the NVIDIA driver")
        return
    gpus = [line for line in out.stdout.splitlines() if "UUID: GPU-" in line]
    if out.returncode or not gpus:
        report("FAIL", "GPUs: nvidia-smi lists none", "check the driver and /dev/nvidia*")
    for line in gpus:
        report("ok", f"GPU {line.strip()}", "")


def check_socket(settings: Settings, report: Report) -> None:
    path = settings.socket
    if not path.exists():
        report("warn", f"socket {path}: absent (daemon not running)", "start `tensorferry serve`")
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o007:
        report("warn", f"socket {path}: mode {mode:o}", "any local user can load models: "
               "use socket_mode = \"660\" and socket_group")  # fmt: skip
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError as exc:
            report("FAIL", f"socket {path}: cannot connect ({exc.strerror})",
                   "a dead daemon left it: start the daemon; or fix the permissions")  # fmt: skip
            return
    report("ok", f"socket {path}: accepting connections (mode {mode:o})", "")


async def _check_sources(settings: Settings, report: Report) -> None:
    from tensorferry.daemon.source import parse_uri
    from tensorferry.daemon.store.factory import open_store

    if not settings.allow:
        report("FAIL" if not settings.allow_any_source else "warn", "allowlist: empty",
               'add [sources] allow = ["s3://bucket/prefix/", "/models"]')  # fmt: skip
    from tensorferry.daemon.store.s3 import S3Backend

    async with contextlib.AsyncExitStack() as stack:
        try:
            backend: S3Backend | None = await stack.enter_async_context(S3Backend(settings.s3))
        except ImportError:  # aiobotocore is not installed (local sources only)
            backend = None
        for entry in settings.allow:
            ref = parse_uri(entry)
            if ref.scheme == "local":
                ok = ref.path is not None and os.access(ref.path, os.R_OK | os.X_OK)
                fix = "" if ok else "create it or make it readable by the daemon's user"
                report("ok" if ok else "FAIL", f"allowlist {entry}: local directory", fix)
                continue
            if backend is None:
                report("FAIL", f"allowlist {entry}: S3 support is not installed",
                       "pip install 'tensorferry[daemon]' on the daemon's host")  # fmt: skip
                continue
            try:
                await open_store(ref, backend).list_objects()
            except Exception as exc:
                report("FAIL", f"allowlist {entry}: {getattr(exc, 'message', exc)}",
                       "check credentials, region/endpoint and the bucket policy")  # fmt: skip
            else:
                report("ok", f"allowlist {entry}: listable with the daemon's credentials", "")


def check_link(settings: Settings, report: Report, sys_net: Path = SYS_NET) -> None:
    link = link_rate(settings.s3.target_rate, sys_net)
    what = f"link: {link.describe()}"
    if link.assumed:
        report("warn", what, "set [s3] target_rate to what this host's network carries (e.g. "
               '"11GiB" for 100 Gb/s): loads size their GETs in flight for it')  # fmt: skip
    else:
        report("ok", what, "")


def check_ring(settings: Settings, report: Report, sys_net: Path = SYS_NET) -> None:
    """The pinned ring an "auto" config gets here (per NUMA node with GPUs)."""
    from tensorferry.daemon.config.values import size_text
    from tensorferry.daemon.gpu.sizing import mem_total, ring_size

    cuda = settings.cuda
    if cuda.api == "off" or (cuda.api == "auto" and shutil.which("nvidia-smi") is None):
        return
    slot = cuda.slot_size or settings.s3.chunk_size
    size = ring_size(cuda, slot, link_rate(settings.s3.target_rate, sys_net), 1, mem_total())
    report("ok", f"pinned ring: {size.slots} slots x {size_text(slot)} = "
           f"{size.slots * slot >> 20} MiB per NUMA node with GPUs ({size.why})", "")  # fmt: skip


def check_hardlinks(
    settings: Settings, report: Report, sysctl: Path = Path("/proc/sys/fs/protected_hardlinks")
) -> None:
    """Local sources are opened with no symlink followed; a hard link is a file like any
    other, so the kernel's rule is what keeps another user's links out of the allowlist."""
    if not any(entry.startswith(("/", "file:")) for entry in settings.allow):
        return
    with contextlib.suppress(OSError):
        if sysctl.read_text().strip() == "0":
            report("warn", "fs.protected_hardlinks = 0", "set it to 1 (sysctl): without it, "
                   "a user who can write into an allowlisted directory can hard-link any file "
                   "the daemon can read (its credentials) into it and fetch it")  # fmt: skip


def run(settings: Settings, print_line: Callable[[str], None] = print) -> int:
    failures = 0

    def report(level: str, what: str, fix: str) -> None:
        nonlocal failures
        failures += level == "FAIL"
        print_line(f"{level:4}  {what}" + (f"\n      fix: {fix}" if fix else ""))

    check_memlock(report)
    check_shm(settings, report)
    check_gpus(report)
    from tensorferry.daemon.gpu.doctor_gpu import check_cuda_api, check_daemon_gpus

    check_cuda_api(settings, report)
    check_link(settings, report)
    check_ring(settings, report)
    check_socket(settings, report)
    check_daemon_gpus(settings, report)
    check_hardlinks(settings, report)
    asyncio.run(_check_sources(settings, report))
    return 1 if failures else 0
