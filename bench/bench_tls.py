"""HTTPS at the cost of its cipher (#26): CPU seconds per GB of each way to read one object
over TLS, side by side, from one SeaweedFS serving its S3 API over https itself.

    .venv/bin/python bench/bench_tls.py [--size-mib 512] [--runs 2] [--concurrency 16] [--json F]

(a) uvloop-ssl  ``HttpPool.get_into`` over uvloop's SSL transport (the path before #26)
(b) memory-bio  ``HttpPool.get_into`` with our TLS over memory BIOs (the daemon's path now)
(c) plain       ``HttpPool.get_into`` of the same object over plain HTTP
(d) curl        one curl process, 32 parallel 8 MiB range GETs over https to /dev/null
(e) awscrt      AWS CRT's S3 client (native threads and TLS), 8 MiB parts into /dev/shm
(f) openssl     ``openssl speed -evp`` of AES-256-GCM and AES-128-GCM, as s/GB
and the whole daemon loading the object as a model over https and over plain HTTP (a
recycled arena: the first load of each daemon is a warm-up). (a)-(c) and (e) run in
processes of their own (``_tls_readers.py``) measuring their own CPU; each does a warm-up
run first. GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _contenders import BUCKET, RANGE, Contenders, tensorferry_daemon, upload_model

from tensorferry.client import Client
from tensorferry.devtools.s3server import S3Server, make_client
from tensorferry.devtools.tls_store import TlsStore, run_seaweed_tls

READERS = Path(__file__).resolve().with_name("_tls_readers.py")


def signed(server: S3Server, key: str) -> str:
    """A presigned GET (no request: make_client ignores AWS_CA_BUNDLE, on purpose)."""
    url: str = make_client(server).generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=3600
    )
    return url


def pool_reader(
    mode: str, store: TlsStore, key: str, size: int, args: argparse.Namespace
) -> list[dict[str, float]]:
    url = signed(store.plain if mode == "plain" else store.server, key)
    etag = store.plain.client().head_object(Bucket=BUCKET, Key=key)["ETag"]
    ca = store.ca
    argv = [str(READERS), "pool", mode, url, str(ca), str(size), str(args.concurrency)]
    return _child([*argv, str(args.runs), etag])


def curl_reader(
    store: TlsStore, key: str, size: int, work: Path, args: argparse.Namespace
) -> list[dict[str, float]]:
    """One curl process, 32 parallel 8 MiB range GETs over https to /dev/null; its CPU."""
    url = signed(store.server, key)
    groups = [
        f'url = "{url}"\nrange = "{start}-{min(start + RANGE, size) - 1}"\noutput = "/dev/null"\n'
        f'fail\nsilent\nshow-error\ncacert = "{store.ca}"\n'
        for start in range(0, size, RANGE)
    ]
    config = work / "curl-tls.cfg"
    config.write_text("next\n".join(groups))  # without "next" the last range applies to all
    argv = ["curl", "--silent", "--show-error", "--parallel", "--parallel-immediate",
            "--parallel-max", "32", "-K", str(config)]  # fmt: skip
    runs = []
    for _ in range(args.runs + 1):
        cpu0, t0 = _children_cpu(), time.monotonic()
        subprocess.run(argv, check=True, timeout=1800)
        runs.append({"seconds": time.monotonic() - t0, "cpu_s": _children_cpu() - cpu0})
    return runs


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def crt_reader(store: TlsStore, key: str, size: int, runs: int) -> list[dict[str, float]]:
    s = store.server
    argv = [str(READERS), "crt", s.endpoint, str(store.ca), BUCKET, key, str(size), str(runs)]
    return _child([*argv, s.access_key, s.secret_key, s.region])


def _child(argv: list[str]) -> list[dict[str, float]]:
    out = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=1800, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{argv[1]} reader failed: {out.stderr[-3000:]}")
    runs: list[dict[str, float]] = json.loads(out.stdout.splitlines()[-1])
    return runs


def openssl_speed(cipher: str) -> float:
    """Seconds per GB of ``cipher`` on 16 KiB blocks (a TLS record's size), one core."""
    out = subprocess.run(
        ["openssl", "speed", "-evp", cipher, "-bytes", "16384", "-seconds", "2"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    line = next(ln for ln in out.stdout.splitlines() if ln.lower().startswith(cipher.lower()))
    kbytes = float(re.split(r"\s+", line.strip())[-1].removesuffix("k"))
    return 1e9 / (kbytes * 1000)


def daemon_loads(
    work: Path, server: S3Server, keys: list[str], nbytes: int, runs: int
) -> list[dict[str, float]]:
    """The whole daemon: a warm-up load, then ``runs`` cold loads into a recycled arena."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **server.env(), "TENSORFERRY_SOCKET": str(work / "tf.sock")}
    c = Contenders(server, env, work)
    with tensorferry_daemon(work, server, nbytes // (1 << 20) + 64) as daemon:
        with Client(env["TENSORFERRY_SOCKET"]) as tfc:
            c.daemon_pid, c.instance = daemon.pid, tfc.status().instance_id
        samples = [c.tensorferry(keys, nbytes) for _ in range(runs + 1)]
    return [{"seconds": s.seconds, "cpu_s": s.cpu_s, "bytes": s.bytes} for s in samples]


def figures(runs: list[dict[str, float]], nbytes: int) -> dict[str, float]:
    """The measured runs' totals (the warm-up, first, left out)."""
    measured = runs[1:] or runs
    seconds = sum(r["seconds"] for r in measured)
    cpu = sum(r["cpu_s"] for r in measured)
    gb = nbytes * len(measured) / 1e9
    return {"cpu_s_per_gb": cpu / gb, "gbps": gb / seconds, "runs": len(measured)}


def negotiated(store: TlsStore) -> str:
    import socket

    context = ssl.create_default_context(cafile=str(store.ca))
    host, port = store.server.endpoint.removeprefix("https://").rsplit(":", 1)
    with (
        socket.create_connection((host, int(port))) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        cipher = tls.cipher()
    return f"{cipher[1]} {cipher[0]}" if cipher else "?"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with run_seaweed_tls(work / "seaweed") as store:
        # The daemons trust the throwaway CA through it.
        os.environ["AWS_CA_BUNDLE"] = str(store.ca)
        keys, nbytes = upload_model(work, store.plain, args.size_mib, 1)
        [key] = keys
        cipher = negotiated(store)
        print(f"==> {nbytes / 1e9:.2f} GB over {cipher}", flush=True)
        results: dict[str, dict[str, float]] = {}
        for name, mode in [("(a) uvloop-ssl", "uvloop"), ("(b) memory-bio", "bio"),
                           ("(c) plain", "plain")]:  # fmt: skip
            results[name] = figures(pool_reader(mode, store, key, nbytes, args), nbytes)
            print(f"    {name}: {results[name]}", flush=True)
        results["(d) curl"] = figures(curl_reader(store, key, nbytes, work, args), nbytes)
        try:
            results["(e) awscrt"] = figures(crt_reader(store, key, nbytes, args.runs), nbytes)
        except (RuntimeError, ImportError) as exc:
            print(f"    awscrt skipped: {exc}", flush=True)
        for cipher in ("aes-256-gcm", "aes-128-gcm"):
            results[f"(f) openssl {cipher}"] = {"cpu_s_per_gb": openssl_speed(cipher)}
        for name, server in [("https", store.server), ("plain", store.plain)]:
            loads = daemon_loads(work / f"daemon-{name}", server, keys, nbytes, args.runs)
            results[f"daemon {name}"] = figures(loads, nbytes)
    return {"bytes": nbytes, "cipher": cipher, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tf-bench-tls-"))
    try:
        report = run(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'reader':<28} {'CPU-s/GB':>9} {'GB/s':>6}")
    for name, r in report["results"].items():
        gbps = f"{r['gbps']:6.2f}" if "gbps" in r else "     -"
        print(f"{name:<28} {r['cpu_s_per_gb']:9.2f} {gbps}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
