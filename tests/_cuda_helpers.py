"""Worker processes for the CUDA tests (fake and real): tests/cuda_worker.py."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tensorferry.devtools.modelgen import random_tensor
from tests.conftest import Daemon

WORKER = Path(__file__).with_name("cuda_worker.py")
#: What GPU inference loads: bf16 weights, fp8 and int8 quantised ones.
DTYPES = (torch.bfloat16, torch.float8_e4m3fn, torch.int8)
#: A worker's first line: CUDA init, a 256 MiB load and a check of every byte.
REPORT_TIMEOUT = 120.0


def visible_device(gpu_uuid: object) -> str:
    """``CUDA_VISIBLE_DEVICES`` naming one GPU by UUID (torch's ``str(props.uuid)`` has no
    prefix). torch reads a UUID only after an upper-case ``GPU-``: ``gpu-...`` would hide
    every GPU from the worker."""
    return f"GPU-{gpu_uuid}"


def write_odd_model(directory: Path, total_bytes: int, *, seed: int = 0) -> Path:
    """One safetensors file whose tensors have odd element counts: their offsets in the
    file are not 256-byte aligned, so the GPU layout must move them."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    size = i = 0
    while size < total_bytes:
        dtype = DTYPES[i % len(DTYPES)]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if i % 2:
            shape = (7 + i, 3)  # small: a norm or a bias
        else:
            shape = (max(1, min(total_bytes // 8, total_bytes - size) // (4095 * itemsize)), 4095)
        t = random_tensor(shape, dtype, gen)
        tensors[f"layers.{i}.weight"] = t
        size += t.nbytes
        i += 1
    path = directory / "model.safetensors"
    save_file(tensors, str(path))
    return path


@contextlib.contextmanager
def worker(
    daemon: Daemon, uri: str, device: str, model: Path, env: dict[str, str]
) -> Iterator[tuple[dict[str, Any], subprocess.Popen[str]]]:
    """A worker that loaded ``uri`` and checked every byte; on exit it must have closed
    every arena it opened (unless the test killed it)."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(daemon.socket), uri, device, str(model)],
        env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdin is not None
    assert proc.stderr is not None
    try:
        line = read_line(proc, REPORT_TIMEOUT)
        assert line, proc.stderr.read()
        yield json.loads(line), proc
        if proc.poll() is None:
            proc.stdin.close()
            assert json.loads(read_line(proc, 60)) == {"closed": 0}, proc.stderr.read()
            assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(BrokenPipeError):
                stream.close()


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line of ``proc``'s stdout ('' at its end). A worker silent for ``timeout``
    seconds is killed and the test fails with its stderr: a bare readline would hang the
    whole suite on a hung worker."""
    assert proc.stdout is not None
    stdout = proc.stdout
    # A thread, not select(): the text wrapper buffers lines that select() cannot see.
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True)
    reader.start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        proc.wait()
        reader.join(5)  # it sees the end of the pipe now; the caller may close it next
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise AssertionError(
            f"worker {proc.pid} wrote no line within {timeout:g} s; killed. stderr: {err}"
        ) from None


def wait_for(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert check()
