"""A worker process: load a model through the daemon and check it against the source files.

Usage: python examples/worker.py URI SOURCE_DIR   (socket from $TENSORFERRY_SOCKET)
Prints one JSON line: tensors, bytes, seconds, GB/s, mismatches.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tensorferry.client import Client


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def main() -> int:
    uri, source = sys.argv[1], Path(sys.argv[2])
    with Client() as client:
        t0 = time.monotonic()
        with client.load(uri) as model:
            seconds = time.monotonic() - t0
            mismatches = []
            count = 0
            for shard in sorted(source.glob("*.safetensors")):
                for name, want in load_file(shard).items():
                    got = model.tensors.get(name)
                    count += 1
                    same = (
                        got is not None
                        and got.dtype == want.dtype
                        and got.shape == want.shape
                        and torch.equal(as_bytes(got), as_bytes(want))
                    )
                    if not same:
                        mismatches.append(name)
            if count != len(model.tensors):
                mismatches.append(f"daemon sent {len(model.tensors)} tensors, files have {count}")
            print(json.dumps({
                "tensors": len(model.tensors), "bytes": model.total_bytes, "seconds": seconds,
                "gbps": model.total_bytes / seconds / 1e9, "mismatches": mismatches,
            }))  # fmt: skip
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
