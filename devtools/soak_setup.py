"""The soak's models and its fault injector.

Models are generated (`modelgen`), uploaded to the soak's bucket, and described to the
workers by a digest per tensor taken from ``safetensors.torch.load_file`` of the local
copy: the workers compare every byte they are handed against those.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tensorferry.devtools.faults import Fault, Kind, RequestInfo
from tensorferry.devtools.modelgen import write_all_dtypes, write_model
from tensorferry.devtools.s3server import S3Server

BUCKET = "soak"
#: The daemon's range size: small, so each load has dozens of data GETs to fault.
CHUNK = 256 << 10
MiB = 1 << 20


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (the workers hash what they are handed the same way)."""
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().data).hexdigest()


def describe(t: torch.Tensor) -> list[Any]:
    return [str(t.dtype), list(t.shape), tensor_digest(t)]


def write_models(root: Path) -> dict[str, Path]:
    """Four small models: one file, shards with an index, many small tensors, every dtype
    (with 0-d and empty tensors). Small, so that loads are many on two cores."""
    models = {
        "single": root / "single",
        "sharded": root / "sharded",
        "many": root / "many",
        "dtypes": root / "dtypes",
    }
    write_model(models["single"], 10 * MiB, seed=11, layer_bytes=MiB)
    write_model(models["sharded"], 18 * MiB, shards=3, seed=12, layer_bytes=2 * MiB)
    write_model(models["many"], 3 * MiB, seed=13, layer_bytes=64 << 10)
    write_all_dtypes(models["dtypes"], seed=14)
    return models


def digests(directory: Path) -> dict[str, list[Any]]:
    """Tensor name -> [dtype, shape, sha256] over every shard in ``directory``."""
    out: dict[str, list[Any]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update({name: describe(t) for name, t in load_file(path).items()})
    return out


def publish(s3: S3Server, models: dict[str, Path], prefix: str) -> dict[str, Any]:
    """Upload every model under ``s3://soak/<prefix><name>/``; the workers' plan."""
    s3.create_bucket(BUCKET)
    client = s3.client()
    plan: dict[str, Any] = {}
    try:
        for name, directory in models.items():
            key = f"{prefix}{name}/"
            for path in sorted(directory.iterdir()):
                client.upload_file(str(path), BUCKET, key + path.name)
            plan[name] = {"uri": f"s3://{BUCKET}/{key}", "tensors": digests(directory)}
    finally:
        client.close()
    return plan


def write_plan(path: Path, plan: dict[str, Any]) -> None:
    path.write_text(json.dumps(plan))


# What the proxy does to a GET it faults. Every one of these is one the daemon must survive
# with its retries: stalls shorter than its read timeout, and errors that a range retry (or,
# for headers and the index, a read retried the same way) recovers from. Bit flips are not
# here: a plain safetensors file has no checksum, so only TCP could catch one.
FAULTS: dict[str, Callable[[random.Random], Fault]] = {
    "reset mid-body": lambda r: Fault(reset_after=r.randrange(0, CHUNK)),
    "truncated body": lambda r: Fault(truncate_after=r.randrange(0, CHUNK)),
    "truncated, then silent": lambda r: Fault(truncate_after=r.randrange(0, CHUNK), hang=True),
    "short stall": lambda r: Fault(stall=r.uniform(0.05, 0.4)),
    "stall past read timeout": lambda r: Fault(stall=2.0),
    "503 SlowDown": lambda r: Fault(status=503, s3_code="SlowDown"),
    "500 InternalError": lambda r: Fault(status=500, s3_code="InternalError"),
    "200 whole object": lambda r: Fault(drop_range=True),
    "wrong Content-Range": lambda r: Fault(content_range="bytes 0-1/2"),
}
#: The kinds of request faulted, by the names the options use. Headers and the index are
#: small ranged GETs from byte 0 (HEADER_GET); listing is botocore's, with its own retries.
TARGETS = {"data": Kind.DATA_GET, "header": Kind.HEADER_GET, "object": Kind.OBJECT_GET}


@dataclasses.dataclass
class Injector:
    """The proxy's fault hook: each GET of a targeted kind is faulted with ``rate`` (data)
    or ``header_rate`` (headers, index), the fault drawn from FAULTS. Runs on the proxy's
    thread; counts are read from any thread."""

    seed: int
    rate: float
    targets: frozenset[Kind]
    #: The rate for header and index reads: they are few, so faulted more often.
    header_rate: float
    fired: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    by_kind: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()

    def __call__(self, req: RequestInfo) -> Fault | None:
        if req.kind not in self.targets:
            return None
        with self._lock:
            rate = self.rate if req.kind is Kind.DATA_GET else self.header_rate
            if self._random.random() >= rate:
                return None
            name = self._random.choice(list(FAULTS))
            self.fired[name] += 1
            self.by_kind[req.kind.value] += 1
            return FAULTS[name](self._random)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.fired), dict(self.by_kind)
