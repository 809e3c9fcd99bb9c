"""A real worker process for tests: loads a model, reports progress, holds the lease.

Usage: python tests/worker.py SOCKET URI
Prints "progress DONE TOTAL" lines, then "ready MODEL_ID NTENSORS CHECKSUM", then holds
the lease until stdin closes (or the process is killed).
"""

import sys

import torch

from tensorferry.client import Client


def main() -> None:
    socket, uri = sys.argv[1], sys.argv[2]

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "fetch":
            print(f"progress {done} {total}", flush=True)

    with Client(socket) as client:
        model = client.load(uri, progress=progress)
        checksum = sum(
            int(t.reshape(-1).view(torch.uint8).sum(dtype=torch.int64))
            for t in model.tensors.values()
        )
        print(f"ready {model.model_id} {len(model.tensors)} {checksum}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
