"""Shared by the hostile-input tests: raw safetensors files, and loads that must be refused."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest

from tensorferry.errors import TensorferryError
from tests.conftest import Daemon, daemon_env, running_daemon

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def write_raw(
    directory: Path, doc: bytes, data: bytes = b"", name: str = "model.safetensors"
) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(struct.pack("<Q", len(doc)) + doc + data)
    return str(directory) + "/"


def local_daemon(local_root: Path) -> contextlib.AbstractContextManager[Daemon]:
    return running_daemon(daemon_env(None), allow=[str(local_root)])


def refusal(daemon: Daemon, uri: str, device: str = "cpu") -> TensorferryError:
    with daemon.client() as client, pytest.raises(TensorferryError) as info:
        client.load(uri, device)
    assert daemon.segments() == []
    return info.value
