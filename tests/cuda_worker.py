"""A worker process for CUDA tests: loads onto a GPU, checks every byte, holds the lease.

Usage: python tests/cuda_worker.py SOCKET URI DEVICE MODEL_DIR
Loads URI onto DEVICE (real CUDA, or the fake one $TENSORFERRY_FAKE_CUDA names), compares
every tensor with ``safetensors.torch.load_file`` (onto the same device with real CUDA),
prints one JSON line {"model_id", "attached", "tensors", "device"}, then holds the lease
until stdin closes; it then drops its views and prints {"closed": <arenas still open>}.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tensorferry.client import Client


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def main() -> None:
    socket, uri, device, model_dir = sys.argv[1:5]
    fake = device.startswith("cuda") and not torch.cuda.is_available()
    want: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        want.update(load_file(f, device="cpu" if fake else device))
    with Client(socket) as client:
        model = client.load(uri, device)
        got = model.tensors
        assert sorted(got) == sorted(want), (sorted(got)[:3], sorted(want)[:3])
        for name, expected in want.items():
            actual = got[name]
            assert actual.dtype == expected.dtype, name
            assert actual.shape == expected.shape, name
            assert actual.device == expected.device, (name, actual.device, expected.device)
            assert torch.equal(as_bytes(actual), as_bytes(expected)), name
            assert actual.numel() == 0 or actual.data_ptr() % 256 == 0, name
        first = next(iter(got.values()))
        report = {"model_id": model.model_id, "attached": model.attached, "tensors": len(got),
                  "device": str(first.device)}  # fmt: skip
        print(json.dumps(report), flush=True)
        sys.stdin.read()
        del model, got, first, actual, expected, want
        gc.collect()
    from tensorferry.client import _cuda

    _cuda.close_released()  # the views' finalizer only queued the close
    print(json.dumps({"closed": len(_cuda._open)}), flush=True)


if __name__ == "__main__":
    main()
