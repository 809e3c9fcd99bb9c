"""A fresh daemon as fast as a warm one (issue #26), with a real daemon and SeaweedFS: the
first load's arena reserved alongside its fetch, "arena" apart from "first byte" in the
record and in `tensorferry status`, and the warm pool ([limits] warm_bytes)."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tensorferry.devtools.daemon import wait_serving
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server
from tensorferry.env import WARM_PACE
from tests.conftest import (
    BUCKET,
    SHM,
    Daemon,
    as_bytes,
    assert_clean,
    daemon_env,
    eventually,
    running_daemon,
    short_dir,
    upload,
)

CHUNKS = 'chunk_size = "2MiB"\nconcurrency = 4'


def _data_size(path: Path) -> int:
    header_len: int = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return path.stat().st_size - 8 - header_len


def _arena_size(path: Path) -> int:
    return -(-_data_size(path) // 4096) * 4096


def _rss_shmem(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem")


def _files(d: Daemon) -> list[Path]:
    return sorted(
        p for p in SHM.glob(f"tensorferry.{d.instance}.*")
        if not p.name.endswith((".lock", ".sealed"))
    )  # fmt: skip


def _load_and_check(d: Daemon, uri: str, model_file: Path) -> None:
    want = load_file(model_file)
    with d.client() as client, client.load(uri) as model:
        assert not model.attached
        for name, tensor in want.items():
            assert (
                as_bytes(model.tensors[name]).numpy().tobytes()
                == as_bytes(tensor).numpy().tobytes()
            ), name


def test_a_fresh_daemons_first_load_is_byte_exact_and_says_when_its_arena_was_ready(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    # Several 16 MiB regions, each reserved while earlier ranges are in flight.
    [path] = write_model(tmp_path / "m", 40 << 20, layer_bytes=3 << 20, seed=11)
    uri = upload(s3, tmp_path / "m", prefix)
    with running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], s3_config=CHUNKS) as d:
        _load_and_check(d, uri, path)
        with d.client() as client:
            status = client.status()
        [r] = status.recent_loads
        assert r.outcome == "ready"
        assert r.bytes == _data_size(path)
        assert 0 < r.plan_seconds <= r.arena_seconds <= r.total_seconds
        assert r.first_byte_seconds <= r.total_seconds
        out = subprocess.run(
            [sys.executable, "-m", "tensorferry", "status", "--socket", str(d.socket)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        line = (
            f"  load ready {uri}: plan {r.plan_seconds:.2f}s arena {r.arena_seconds:.2f}s "
            f"first byte {r.first_byte_seconds:.2f}s fetch {r.fetch_seconds:.2f}s total "
            f"{r.total_seconds:.2f}s {r.gbps:.2f} GB/s "
        )
        assert line in out.splitlines()
        assert_clean(d)


def test_the_first_load_that_fits_takes_the_warm_pool(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    [path] = write_model(tmp_path / "m", 24 << 20, layer_bytes=3 << 20, seed=12)
    uri = upload(s3, tmp_path / "m", prefix)
    warm = 32 << 20
    limits = f'[limits]\nwarm_bytes = "{warm >> 20}MiB"\n'
    with running_daemon(
        daemon_env(s3), allow=[f"s3://{BUCKET}/"], s3_config=CHUNKS, extra_config=limits
    ) as d:
        with d.client() as client:
            status = client.status()
        assert (status.recycled_bytes, status.resident_bytes) == (warm, 0)
        eventually(lambda: _rss_shmem(status.pid) >= warm, "the warm pool populated")
        [pool] = _files(d)
        assert ".free-" in pool.name
        inode = pool.stat().st_ino
        _load_and_check(d, uri, path)
        with d.client() as client:
            status = client.status()
        arena = _arena_size(path)
        assert (status.recycled_bytes, status.resident_bytes) == (0, arena)
        [segment] = _files(d)
        assert segment.name in status.arenas
        assert segment.stat().st_ino == inode  # the pool's pages, under the arena's name
        assert segment.stat().st_size == arena
        [r] = status.recent_loads
        assert r.arena_seconds <= r.first_byte_seconds
        assert_clean(d)


def test_the_warm_pool_does_not_delay_ready_and_stops_at_shutdown(
    s3: S3Server, tmp_path: Path
) -> None:
    # Paced (tests only) to a region per 60 s: at READY, and until the stop, at most the
    # first region of each populating thread is in, however loaded the machine is.
    warm = 256 << 20
    limits = f'[limits]\nwarm_bytes = "{warm >> 20}MiB"\n'
    notify = short_dir() / "notify"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ready:
            ready.bind(str(notify))
            ready.settimeout(60)
            env = {**daemon_env(s3), "NOTIFY_SOCKET": str(notify), WARM_PACE: "60"}
            allow = [f"s3://{BUCKET}/"]
            with running_daemon(env, allow=allow, extra_config=limits, wait=False) as d:
                while b"READY=1" not in ready.recv(4096):
                    pass
                # READY did not wait for the pool: it cannot be full before the stop.
                assert _rss_shmem(d.proc.pid) <= warm // 2
                d.instance = wait_serving(d.proc, d.socket, log=d.log).instance_id
                with d.client() as client:
                    assert client.status().recycled_bytes == warm
                # Stopped mid-pool (the pause ends at once): its segment goes.
                assert d.stop(signal.SIGTERM, timeout=20) == 0
                assert _files(d) == []
                [done] = [line for line in d.output().splitlines() if "warm pool: " in line]
                populated = int(done.split("warm pool: ")[1].split()[0])
                assert 0 < populated <= warm // 2
                assert done.endswith(f"warm pool: {populated} of {warm} bytes populated")
    finally:
        shutil.rmtree(notify.parent, ignore_errors=True)
