"""Runs in a spawned process: another process opening a fake CUDA IPC handle."""

from __future__ import annotations


def read_arena(uuids: list[str], handle: bytes, ordinal: int) -> bytes:
    from tensorferry.cuda.fake import FakeCudaApi

    api = FakeCudaApi.from_uuids(uuids)
    try:
        ptr = api.ipc_open(handle, ordinal)
        assert api.pointer_device(ptr) == ordinal
        data = api.read(ptr, 64 << 10)
        api.ipc_close(ptr, ordinal)
        return data
    finally:
        api.close()
