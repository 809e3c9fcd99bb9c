"""A seeded fault run: the store misbehaves in every way we know; loads still come out right.

The counting proxy injects faults into data GETs at a rate a working retry policy survives.
"""

from __future__ import annotations

import collections
import gc
import random
import threading
import time
from pathlib import Path

from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import TensorferryError
from tests.conftest import (
    BUCKET,
    as_bytes,
    assert_clean,
    daemon_env,
    running_daemon,
    upload,
)

CHUNK = 256 << 10
FAULTS = {
    "reset mid-body": lambda r: Fault(reset_after=r.randrange(1, CHUNK)),
    "truncated body": lambda r: Fault(truncate_after=r.randrange(0, CHUNK)),
    "truncated, then silent": lambda r: Fault(truncate_after=r.randrange(0, CHUNK), hang=True),
    "stall past read timeout": lambda r: Fault(stall=0.8),
    "slow trickle": lambda r: Fault(trickle=0.01),
    "503 SlowDown": lambda r: Fault(status=503, s3_code="SlowDown"),
    "500 InternalError": lambda r: Fault(status=500, s3_code="InternalError"),
    "200 whole object": lambda r: Fault(drop_range=True),
    "wrong Content-Range": lambda r: Fault(content_range="bytes 0-1/2"),
}
S3_CONFIG = (
    f'chunk_size = "{CHUNK // 1024}KiB"\nconcurrency = 8\nread_timeout = 0.5\n'
    "attempts = 6\nretry_budget = 24"
)


class Injector:
    def __init__(self, seed: int, rate: float) -> None:
        self.random = random.Random(seed)
        self.rate = rate
        self.fired: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET:
            return None
        with self.lock:
            if self.random.random() >= self.rate:
                return None
            # Round-robin over the kinds keeps every kind well represented.
            name = list(FAULTS)[sum(self.fired.values()) % len(FAULTS)]
            self.fired[name] += 1
            return FAULTS[name](self.random)


def test_seeded_fault_run(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 4 << 20, shards=2, layer_bytes=1 << 20)
    want = {}
    for f in sorted((tmp_path / "m").glob("*.safetensors")):
        want.update(load_file(f))
    uri = upload(s3, tmp_path / "m", prefix)
    inject = Injector(seed=20261125, rate=0.22)
    outcomes: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    t0 = time.monotonic()
    with (
        CountingProxy(s3.endpoint, fault=inject) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], s3_config=S3_CONFIG
        ) as d,
        d.client() as client,
    ):
        while sum(inject.fired.values()) < 240 and time.monotonic() - t0 < 90:
            try:
                model = client.load(uri)
            except TensorferryError as exc:
                outcomes["failed"] += 1
                errors.append(f"{exc.code.name}: {exc.message}")
            else:
                same = sorted(model.tensors) == sorted(want) and all(
                    as_bytes(model.tensors[k]).equal(as_bytes(v)) for k, v in want.items()
                )
                outcomes["ok" if same else "CORRUPT"] += 1
                model.close()
                del model
                gc.collect()
            client.evict(uri) if client.list() else None
        records = client.status().recent_loads
        assert_clean(d)
        assert d.segments() == []
    total = sum(outcomes.values())
    retries = sum(r.retries for r in records)
    print(f"\n{total} loads in {time.monotonic() - t0:.1f} s: {dict(outcomes)}; faults "
          f"{dict(inject.fired)}; retries in the last {len(records)} loads: {retries}")  # fmt: skip
    assert outcomes["CORRUPT"] == 0
    assert sum(inject.fired.values()) >= 200
    assert min(inject.fired[k] for k in FAULTS) >= 20
    assert outcomes["ok"] >= 0.95 * total, errors
    for e in errors:
        assert e.startswith("UNAVAILABLE: "), e
        assert "(gave up after" in e, e
