"""GPU UUIDs from the CUDA driver API or NVML, never torch, all 16 bytes (issue #27,
defect 6): cupy hands back the UUID cut at its first zero byte."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tensorferry.cuda import CudaError, driver

WITH_ZERO = uuid.UUID("5c3d7a1e-9b00-4e6a-8d1c-2f3e4a5b6c00")


class FakeLibcuda:
    """cuInit, cuDeviceGet and cuDeviceGetUuid_v2 as ctypes calls them (status 0: success)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.asked: list[int] = []

    def cuInit(self, flags: int) -> int:
        return 0

    def cuDeviceGet(self, device: Any, ordinal: int) -> int:
        device._obj.value = ordinal + 100  # a driver handle, not the ordinal itself
        self.asked.append(ordinal)
        return 0

    def cuDeviceGetUuid_v2(self, out: Any, device: ctypes.c_int) -> int:
        assert device.value in (100, 101, 102, 103)
        ctypes.memmove(out._obj, self.raw, 16)
        return 0


def test_a_uuid_with_zero_bytes_keeps_all_sixteen() -> None:
    assert driver.format_uuid(WITH_ZERO.bytes) == f"GPU-{WITH_ZERO}"
    with pytest.raises(CudaError, match="a GPU UUID has 16 bytes, got 5"):
        driver.format_uuid(WITH_ZERO.bytes.partition(b"\0")[0])


def test_the_driver_api_gives_the_whole_uuid() -> None:
    lib = FakeLibcuda(WITH_ZERO.bytes)
    assert driver.driver_uuid(3, lib) == f"GPU-{WITH_ZERO}"
    assert lib.asked == [3]


def test_the_daemons_uuid_path_reads_the_driver_and_never_imports_torch() -> None:
    # In a fresh process: this one has torch loaded already. cupy handed back the UUID cut
    # at its zero byte; the driver (stood in for) has all of it.
    code = f"""
import json, sys, uuid
from tensorferry.cuda import driver
from tensorferry.cuda.cupy_api import _uuid_of
from tests.test_cuda_uuid import FakeLibcuda
raw = uuid.UUID({str(WITH_ZERO)!r}).bytes
driver.libcuda = lambda: FakeLibcuda(raw)
got = _uuid_of({{"uuid": raw.partition(b"\\0")[0]}}, 1)
print(json.dumps({{"uuid": got, "torch": "torch" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {"uuid": f"GPU-{WITH_ZERO}", "torch": False}


class NoDevice(FakeLibcuda):
    def cuDeviceGet(self, device: Any, ordinal: int) -> int:
        return 101  # CUDA_ERROR_INVALID_DEVICE


def test_a_driver_error_names_the_call() -> None:
    with pytest.raises(CudaError) as info:
        driver.driver_uuid(7, NoDevice(WITH_ZERO.bytes))
    assert str(info.value) == "cuDeviceGet(7) failed with status 101"


def test_doctor_fails_a_gpu_host_whose_daemon_would_serve_cpu_only() -> None:
    from tensorferry.daemon.config.settings import Settings
    from tensorferry.daemon.gpu.doctor_gpu import check_cuda_api

    lines: list[tuple[str, str, str]] = []
    check_cuda_api(Settings(), lambda *line: lines.append(line), driver_count=lambda: 8,
                   api=lambda: None)  # fmt: skip
    assert lines == [(
        "FAIL",
        "CUDA: the NVIDIA driver lists 8 GPU(s) but cupy cannot use them: the daemon serves "
        "CPU arenas only",
        "pip install 'tensorferry[cuda]' (cupy-cuda12x or cupy-cuda13x, as nvidia-smi's CUDA "
        "version says); torch's CUDA build does not matter, it is never used",
    )]  # fmt: skip
    lines.clear()
    check_cuda_api(Settings(), lambda *line: lines.append(line), driver_count=lambda: 0,
                   api=lambda: None)  # fmt: skip
    assert lines == []  # a CPU host: nothing to say


def test_auto_on_a_gpu_host_without_usable_cupy_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from tensorferry.daemon.gpu import runtime
    from tensorferry.daemon.gpu.settings import CudaSettings

    monkeypatch.setattr(runtime, "real_api", lambda: None)
    monkeypatch.setattr(runtime, "driver_gpus", lambda: 2)
    with caplog.at_level(logging.WARNING, "tensorferry.daemon.gpu.runtime"):
        assert runtime._api(CudaSettings(api="auto")) is None
    assert (
        "the NVIDIA driver lists 2 GPU(s) but cupy cannot use them (not installed, or built "
        "for another CUDA; torch is never asked): serving CPU arenas only"
    ) in caplog.text
