"""Exportable device memory on the fake CUDA API (tensorferry/cuda/fake_vmm.py): memory
that outlives the process that made it while systemd's descriptor store (the stand-in,
devtools/fdstore.py) keeps its descriptor, and is gone once neither a descriptor nor a
mapping of it is left. No GPU, no daemon: the design in docs/cuda.md, on the fake."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorferry.cuda.api import CudaError, FakeDevice
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.cuda.fake_vmm import GRANULARITY
from tensorferry.daemon import systemd
from tensorferry.devtools.fdstore import FdStoreStandIn
from tests.conftest import short_dir

GPU = "GPU-6f1c0a52-8b9e-4c2d-a1f0-3e7d5b9c2a41"
OTHER = "GPU-0d2e4f60-1a3b-4c5d-8e9f-a0b1c2d3e4f5"
SIZE = GRANULARITY
NAME = f"gpu-{GPU}-t0"
TIMEOUT = 30.0
#: Run by the stand-in. "create": export new memory, fill it, store its descriptor, wait
#: for SIGKILL. "import": take the descriptor, map it, read it; with a go-file, read it
#: again once that file exists (the store may have dropped it meanwhile).
CHILD = """
import ctypes, hashlib, json, os, signal, sys, time
from pathlib import Path
from tensorferry.cuda.api import FakeDevice
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon import systemd
mode, gpu, name, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
api = FakeCudaApi([FakeDevice(gpu)])
digest = lambda ptr: hashlib.sha256(ctypes.string_at(ptr, size)).hexdigest()
if mode == "create":
    ptr, fd = api.mem_create_exportable(0, size)
    ctypes.memmove(ptr, hashlib.shake_256(b"tf-vmm").digest(size), size)
    ino = os.fstat(fd).st_ino
    assert systemd.FdStore().store(name, fd)
    os.close(fd)
    print(json.dumps({"ino": ino}), flush=True)
    systemd.notify("READY=1")
    while True:
        signal.pause()
taken = systemd.FdStore().take()
ptr = api.mem_import(taken[name], 0)
os.close(taken[name])
report = {"names": sorted(taken), "first": digest(ptr)}
if len(sys.argv) > 5:
    systemd.notify("STATUS=mapped")
    go, deadline = Path(sys.argv[5]), time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not go.exists():
        sys.exit("the go file never came")
    report["second"] = digest(ptr)
api.mem_release(ptr)
report["left"] = api.vmm_mappings
print(json.dumps(report), flush=True)
systemd.notify("READY=1")
"""
PATTERN = hashlib.shake_256(b"tf-vmm").digest(SIZE)


@pytest.fixture
def tmp() -> Iterator[Path]:
    directory = short_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def last_json(log: Path) -> dict[str, object]:
    report: dict[str, object] = json.loads(log.read_text().splitlines()[-1])
    return report


def create_and_kill(sd: FdStoreStandIn, tmp: Path) -> int:
    """A process exports memory, fills it, stores its descriptor and is SIGKILLed; the
    memfd's inode number."""
    log = tmp / "create.log"
    argv = [sys.executable, "-c", CHILD, "create", GPU, NAME, str(SIZE)]
    proc = sd.spawn(argv, dict(os.environ), log=log)
    try:
        assert sd.ready.wait(TIMEOUT), log.read_text()
        sd.wait(lambda: sd.names() == [NAME], "the descriptor stored")
        ino = last_json(log)["ino"]
        assert isinstance(ino, int)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as systemd does on a crash
        proc.wait(TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    return ino


def spawn_import(
    sd: FdStoreStandIn, tmp: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / "import.log"
    argv = [sys.executable, "-c", CHILD, "import", GPU, NAME, str(SIZE), *extra]
    return sd.spawn(argv, dict(os.environ), log=log), log


def held_by(pid: str, ino: int) -> tuple[int, int]:
    """(descriptors, mappings) process ``pid`` has of the fake memfd with inode ``ino``."""
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor, or one closed since
            continue
        fds += link.startswith("/memfd:tffakevmm.") and st.st_ino == ino
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    mapped = sum(1 for line in maps if line.split()[4:6] == [str(ino), f"/memfd:tffakevmm.{GPU}"])
    return fds, mapped


def test_the_memory_outlives_its_creator_in_the_store(tmp: Path) -> None:
    with FdStoreStandIn() as sd:
        ino = create_and_kill(sd, tmp)
        assert held_by("self", ino) == (1, 0)  # the store's copy is all that is left
        proc, log = spawn_import(sd, tmp)
        assert proc.wait(TIMEOUT) == 0, log.read_text()
        report = last_json(log)
        assert report == {
            "names": [NAME], "first": hashlib.sha256(PATTERN).hexdigest(), "left": 0,
        }  # fmt: skip
        assert sd.names() == [NAME]  # still stored: the next start gets it again


def test_the_memory_goes_with_its_last_descriptor_and_mapping(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FdStoreStandIn() as sd:
        monkeypatch.setenv("NOTIFY_SOCKET", sd.notify_socket)
        ino = create_and_kill(sd, tmp)
        go = tmp / "go"
        proc, log = spawn_import(sd, tmp, str(go))
        sd.wait(lambda: sd.status == "mapped", "the importer mapped it")
        # It closed the descriptor it took and maps the memory (Python's mmap keeps a
        # descriptor of its own while it maps: that one goes with the mapping).
        assert held_by(str(proc.pid), ino) == (1, 1)
        assert systemd.FdStore().remove(NAME)  # as the daemon does when it frees a model
        sd.wait(lambda: sd.names() == [], "the store dropped it")
        assert held_by("self", ino) == (0, 0)
        go.touch()
        assert proc.wait(TIMEOUT) == 0, log.read_text()
        want = hashlib.sha256(PATTERN).hexdigest()
        assert last_json(log) == {"names": [NAME], "first": want, "second": want, "left": 0}
        # Creator and importer have exited and the store holds nothing: no descriptor
        # and no mapping of the memfd is left, so the kernel has freed its pages.
        assert held_by("self", ino) == (0, 0)


def test_an_import_maps_the_same_memory_in_one_process() -> None:
    api = FakeCudaApi([FakeDevice(GPU, memory=4 * SIZE)])
    try:
        assert api.mem_get_info(0) == (4 * SIZE, 4 * SIZE)
        ptr, fd = api.mem_create_exportable(0, SIZE)
        other = api.mem_import(fd, 0)
        os.close(fd)
        assert other != ptr
        assert api.mem_get_info(0) == (3 * SIZE, 4 * SIZE)  # the import is not counted
        assert api.pointer_device(other + SIZE - 1) == 0
        ctypes.memmove(ptr, PATTERN, SIZE)
        api.mem_release(ptr)
        assert api.mem_get_info(0) == (4 * SIZE, 4 * SIZE)
        assert api.read(other, SIZE) == PATTERN  # the import's mapping keeps it
        # An H2D copy lands in exportable memory as in any allocation.
        host = ctypes.create_string_buffer(b"\x5a" * 4096, 4096)
        api.host_register(ctypes.addressof(host), 4096)
        stream = api.stream_create(0)
        api.memcpy_h2d_async(other + 8192, ctypes.addressof(host), 4096, stream)
        api.stream_synchronize(stream)
        assert api.read(other + 8192, 4096) == b"\x5a" * 4096
        api.host_unregister(ctypes.addressof(host))
        api.mem_release(other)
        assert api.vmm_mappings == 0
        with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE") as info:
            api.mem_release(other)
        assert str(info.value) == f"CUDA_ERROR_INVALID_VALUE: {other:#x} is not a mapped allocation"
    finally:
        api.close()


def test_what_the_fake_refuses() -> None:
    api = FakeCudaApi([FakeDevice(GPU, memory=2 * SIZE), FakeDevice(OTHER)])
    try:
        with pytest.raises(CudaError, match="granularity") as info:
            api.mem_create_exportable(0, SIZE + 4096)
        assert str(info.value) == (
            f"CUDA_ERROR_INVALID_VALUE: {SIZE + 4096} bytes is not a positive multiple of "
            f"the allocation granularity ({GRANULARITY})"
        )
        with pytest.raises(CudaError, match="OUT_OF_MEMORY"):
            api.mem_create_exportable(0, 4 * SIZE)
        ptr, fd = api.mem_create_exportable(0, SIZE)
        with pytest.raises(CudaError, match="INVALID_DEVICE") as info:
            api.mem_import(fd, 1)
        assert str(info.value) == (
            f"CUDA_ERROR_INVALID_DEVICE: the allocation is on {GPU}, not on device 1 ({OTHER})"
        )
        os.close(fd)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(CudaError, match="not an exported") as info:
                api.mem_import(null, 0)
            assert str(info.value) == (
                f"CUDA_ERROR_INVALID_VALUE: descriptor {null} is not an exported allocation "
                "(/dev/null)"
            )
        finally:
            os.close(null)
        api.mem_release(ptr)
    finally:
        api.close()
