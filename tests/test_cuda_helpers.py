"""The helpers of the real-GPU tests, checked without a GPU."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import torch

from tests._cuda_helpers import read_line, visible_device


def test_the_visible_device_names_a_gpu_torch_can_see(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = uuid.UUID("5c3d7a1e-9b2f-4e6a-8d1c-2f3e4a5b6c7d")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible_device(gpu))
    # torch's own parser: only an upper-case "GPU-" reads as a UUID; "gpu-..." hides all.
    assert torch.cuda._parse_visible_devices() == [f"GPU-{gpu}"]


def test_a_silent_worker_fails_the_test_in_time_and_is_killed() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('hung', file=sys.stderr, flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    start = time.monotonic()
    try:
        with pytest.raises(AssertionError) as failed:
            read_line(proc, 1.0)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert time.monotonic() - start < 10
    assert str(failed.value) == (
        f"worker {proc.pid} wrote no line within 1 s; killed. stderr: hung\n"
    )
    assert proc.returncode == -9


def test_a_line_and_the_end_of_output_are_read() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "print('{\"closed\": 0}')"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    with proc.stdout:
        assert read_line(proc, 30) == '{"closed": 0}\n'
        assert read_line(proc, 30) == ""
    assert proc.wait(30) == 0
