"""The readers bench_tls.py runs in processes of their own, each measuring its own CPU
(``RUSAGE_SELF``: every thread, native ones included) around the timed reads.

    python bench/_tls_readers.py pool MODE URL CA SIZE CONCURRENCY RUNS [ETAG]
    python bench/_tls_readers.py crt ENDPOINT CA BUCKET KEY SIZE RUNS ACCESS SECRET REGION

``pool``: ``HttpPool.get_into`` (the daemon's data path, without the daemon) of every 8 MiB
range of one object into one buffer, CONCURRENCY in flight; MODE ``bio`` (our TLS over
memory BIOs), ``uvloop`` (uvloop's SSL transport), ``plain`` (an http URL). ``crt``: AWS
CRT's S3 client (its own threads and TLS) GETting the object in 8 MiB parts to a file in
/dev/shm, as a shared-memory arena would be. Each prints one JSON line: a list of runs, the
first a warm-up (first touch of the destination, connections opened).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RANGE = 8 << 20


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _pool_runs(
    mode: str, url: str, ca: str, size: int, concurrency: int, runs: int, etag: str
) -> list[dict[str, float]]:
    from tensorferry.daemon.store._http import HttpPool

    pool = HttpPool(
        limit=concurrency, connect_timeout=30, read_timeout=60, ca_bundle=Path(ca),
        _uvloop_tls=mode == "uvloop",
    )  # fmt: skip
    dest = memoryview(bytearray(size))
    headers = {"If-Match": etag} if etag else {}
    out = []
    try:
        for _ in range(runs + 1):
            starts = iter(range(0, size, RANGE))

            async def reader(starts: Iterator[int] = starts) -> None:
                for start in starts:
                    end = min(start + RANGE, size)
                    await pool.get_into(url, headers, dest[start:end], start)

            cpu0, t0 = cpu_seconds(), time.monotonic()
            async with asyncio.TaskGroup() as tg:
                for _ in range(concurrency):
                    tg.create_task(reader())
            out.append({"seconds": time.monotonic() - t0, "cpu_s": cpu_seconds() - cpu0})
    finally:
        await pool.aclose()
    return out


def _crt_runs(
    endpoint: str, ca: str, bucket: str, key: str, size: int, runs: int,
    access: str, secret: str, region: str,
) -> list[dict[str, float]]:  # fmt: skip
    from awscrt import auth, http, io, s3

    host = endpoint.split("://", 1)[1]
    bootstrap = io.ClientBootstrap(
        io.EventLoopGroup(), io.DefaultHostResolver(io.EventLoopGroup(1))
    )
    options = io.TlsContextOptions()
    options.override_default_trust_store_from_path(None, ca)
    tls = io.ClientTlsContext(options).new_connection_options()
    tls.set_server_name(host.rsplit(":", 1)[0])
    creds = auth.AwsCredentialsProvider.new_static(access, secret)
    client = s3.S3Client(
        bootstrap=bootstrap, region=region, tls_mode=s3.S3RequestTlsMode.ENABLED,
        tls_connection_options=tls, credential_provider=creds, part_size=RANGE,
        throughput_target_gbps=10.0,
    )  # fmt: skip
    target = Path(f"/dev/shm/tf-bench-crt-{os.getpid()}")
    out = []
    try:
        for _ in range(runs + 1):
            target.unlink(missing_ok=True)
            headers = http.HttpHeaders([("Host", host)])
            request = http.HttpRequest("GET", f"/{bucket}/{key}", headers)
            cpu0, t0 = cpu_seconds(), time.monotonic()
            meta = client.make_request(
                type=s3.S3RequestType.GET_OBJECT, request=request, recv_filepath=str(target),
            )  # fmt: skip
            meta.finished_future.result(timeout=600)
            out.append({"seconds": time.monotonic() - t0, "cpu_s": cpu_seconds() - cpu0})
            if target.stat().st_size != size:
                raise RuntimeError(f"CRT wrote {target.stat().st_size} bytes, not {size}")
    finally:
        target.unlink(missing_ok=True)
    return out


def main(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    result: Any
    if kind == "pool":
        import uvloop

        mode, url, ca, size, conc, runs, *etag = args
        result = uvloop.run(
            _pool_runs(mode, url, ca, int(size), int(conc), int(runs), etag[0] if etag else "")
        )
    elif kind == "crt":
        endpoint, ca, bucket, key, size, runs, access, secret, region = args
        result = _crt_runs(endpoint, ca, bucket, key, int(size), int(runs), access, secret, region)
    else:
        raise SystemExit(f"unknown reader {kind!r}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
