"""One measured load in a fresh process, for bench_load.py. Prints one JSON line.

  _worker.py tensorferry URI                 (socket from $TENSORFERRY_SOCKET)
  _worker.py boto3 BUCKET DEST_DIR KEY...    (endpoint and keys from $AWS_*)
  _worker.py runai S3_URI...                 (concurrency from $RUNAI_STREAMER_CONCURRENCY)

Timing and CPU cover only the load itself: interpreter start and imports are left out, as a
serving process has them behind it before it loads a model. "t0" is time.monotonic() at the
start (CLOCK_MONOTONIC: the parent lines it up with its own samples). $BENCH_DEVICE (default
"cpu") is where the tensors must end up; on a GPU, boto3's and Run:ai's tensors are copied
there as vLLM does, and the clock stops after a device synchronize.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

# Imported up front: the tensorferry client imports torch lazily, inside load().
import torch

DEVICE = os.environ.get("BENCH_DEVICE", "cpu")


def synchronize() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize(DEVICE)


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measured(
    t0: float, seconds: float, cpu0: float, nbytes: int, tensors: dict[str, torch.Tensor],
    **extra: float,
) -> dict[str, Any]:  # fmt: skip
    return {
        "t0": t0, "seconds": seconds, "cpu_s": cpu_seconds() - cpu0, "bytes": nbytes,
        "tensor_bytes": sum(t.nbytes for t in tensors.values()), "tensors": len(tensors),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra,
    }  # fmt: skip


def load_tensorferry(uri: str) -> dict[str, Any]:
    from tensorferry.client import Client

    with Client() as client:
        cpu0, t0 = cpu_seconds(), time.monotonic()
        with client.load(uri, DEVICE) as model:
            seconds = time.monotonic() - t0
            return {
                "t0": t0,
                "seconds": seconds,
                "cpu_s": cpu_seconds() - cpu0,
                "bytes": model.total_bytes,
                "tensors": len(model.tensors),
                "model_id": model.model_id,
                "attached": model.attached,
                "daemon_seconds": model.seconds,
            }


def load_boto3(bucket: str, dest: Path, keys: list[str]) -> dict[str, Any]:
    import boto3  # type: ignore[import-untyped, unused-ignore]
    from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]
    from safetensors.torch import load_file

    # What a user would write: defaults apart from what SeaweedFS on loopback needs.
    s3 = boto3.client(
        "s3", config=Config(signature_version="s3v4", s3={"addressing_style": "path"})
    )
    cpu0, t0 = cpu_seconds(), time.monotonic()
    paths = []
    for key in keys:
        path = dest / Path(key).name
        s3.download_file(bucket, key, str(path))
        paths.append(path)
    t_download = time.monotonic() - t0
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors.update(load_file(path, device=DEVICE))
    synchronize()
    seconds = time.monotonic() - t0
    return measured(
        t0, seconds, cpu0, sum(p.stat().st_size for p in paths), tensors,
        download_seconds=t_download, load_file_seconds=seconds - t_download,
    )  # fmt: skip


def load_runai(uris: list[str]) -> dict[str, Any]:
    # Run:ai Model Streamer as vLLM uses it: every tensor of every file, owned by the caller.
    from runai_model_streamer import SafetensorsStreamer  # type: ignore[import-not-found, unused-ignore]

    tensors: dict[str, torch.Tensor] = {}
    cpu0, t0 = cpu_seconds(), time.monotonic()
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(uris)
        for name, tensor in streamer.get_tensors():
            tensors[name] = tensor.to(DEVICE, non_blocking=True)
    synchronize()
    seconds = time.monotonic() - t0
    return measured(t0, seconds, cpu0, sum(t.nbytes for t in tensors.values()), tensors)


def main() -> int:
    kind, args = sys.argv[1], sys.argv[2:]
    # A process that just imported torch owes Python's first full garbage collection
    # (~75 ms here), which would land inside whichever load allocates objects first. A
    # serving process pays it during its start-up: every contender pays it before its clock.
    gc.collect()
    if kind == "tensorferry":
        result = load_tensorferry(args[0])
    elif kind == "boto3":
        result = load_boto3(args[0], Path(args[1]), args[2:])
    elif kind == "runai":
        result = load_runai(args)
    else:
        raise SystemExit(f"unknown contender {kind!r}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
