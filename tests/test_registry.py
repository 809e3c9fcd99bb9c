"""One resident copy for many workers: shared fetches, attach without GETs, leases."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import (
    BUCKET,
    SHM,
    assert_clean,
    daemon_env,
    eventually,
    running_daemon,
    start_daemon,
    upload,
)

WORKER = str(Path(__file__).with_name("worker.py"))
SLOW = 'chunk_size = "1MiB"\nconcurrency = 2'


def worker(socket: Path, uri: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, str(socket), uri],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def read_until_ready(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, "worker exited before ready"
        lines.append(line.strip())
        if line.startswith("ready"):
            return lines


def data_bytes(directory: Path) -> int:
    import struct

    total = 0
    for f in directory.glob("*.safetensors"):
        (n,) = struct.unpack("<Q", f.read_bytes()[:8])
        total += f.stat().st_size - 8 - n
    return total


def test_overlapping_loads_share_one_fetch_and_attach_needs_no_get(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 12 << 20, shards=2, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)

    def slow_data(req: RequestInfo) -> Fault | None:
        return Fault(stall=0.15) if req.kind is Kind.DATA_GET else None

    with (
        CountingProxy(s3.endpoint, fault=slow_data) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], s3_config=SLOW
        ) as d,
    ):
        proxy.reset()
        first = worker(d.socket, uri)
        assert first.stdout is not None
        done, total = 0, 1
        while not done:  # wait until the first load is fetching, then start the second
            fields = first.stdout.readline().split()
            assert fields[0] == "progress", fields
            done, total = int(fields[1]), int(fields[2])
        assert done < total / 2
        second = worker(d.socket, uri)
        ready_first = read_until_ready(first)[-1].split()
        ready_second = read_until_ready(second)[-1].split()
        assert ready_first[1:] == ready_second[1:]  # same model id, tensors and checksum
        stats = proxy.stats()
        assert stats.body_bytes[Kind.DATA_GET] == data_bytes(tmp_path / "m")
        # One presigned URL serves all of an object's ranges in a load (signing costs CPU).
        gets = [urllib.parse.urlsplit(r.path) for r in stats.log if r.kind is Kind.DATA_GET]
        assert len(gets) > 2
        assert len({g.path for g in gets}) == len({(g.path, g.query) for g in gets}) == 2
        with d.client() as client:
            assert client.list()[0].leases == 2
        proxy.reset()
        proxy.set_fault(None)
        third = worker(d.socket, uri)
        assert read_until_ready(third)[-1].split()[1:] == ready_first[1:]
        stats = proxy.stats()
        gets = sum(stats.requests[k] for k in (Kind.HEADER_GET, Kind.DATA_GET, Kind.OBJECT_GET))
        assert gets == 0
        assert stats.requests[Kind.LIST] == 1  # the version check
        for p in (first, second, third):
            p.communicate("", timeout=30)
        assert_clean(d)


def test_sigkilled_worker_loses_its_lease_and_eviction_frees_the_segment(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 2 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    with running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"]) as d:
        w = worker(d.socket, uri)
        read_until_ready(w)
        with d.client() as client:
            assert client.list()[0].leases == 1
            client.evict(uri)
            assert len(d.segments()) == 1  # held by the lease
            w.send_signal(signal.SIGKILL)
            w.wait(10)
            assert w.stdout is not None
            assert w.stdin is not None
            w.stdout.close()
            w.stdin.close()
            t0 = time.monotonic()
            while client.list() and time.monotonic() - t0 < 5:
                time.sleep(0.02)
            print(f"lease gone {time.monotonic() - t0:.3f} s after SIGKILL")
            assert client.list() == []
        assert d.segments() == []


def test_crash_recovery_sweeps_the_dead_daemons_segments(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 8 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)

    def slow_data(req: RequestInfo) -> Fault | None:
        return Fault(stall=0.2) if req.kind is Kind.DATA_GET else None

    with CountingProxy(s3.endpoint, fault=slow_data) as proxy:
        env = daemon_env(s3, proxy.endpoint)
        allow = [f"s3://{BUCKET}/"]
        crashed = start_daemon(env, allow=allow, s3_config=SLOW)
        w = subprocess.Popen(
            [sys.executable, WORKER, str(crashed.socket), uri],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert w.stdout is not None
        while True:  # mid-load: some bytes are in the arena
            fields = w.stdout.readline().split()
            assert fields[0] == "progress", fields
            if int(fields[1]) > 0:
                break
        crashed.kill_group()  # as systemd does: the whole process group, SIGKILL
        # Nothing cleaned up after the crash (checked at once: any daemon starting on this
        # host, e.g. another test run, would sweep them)...
        assert crashed.segments() != []
        out, err = w.communicate("", timeout=30)
        assert w.returncode != 0
        assert f"tensorferry daemon is not running at {crashed.socket}" in err
        assert crashed.socket.exists()
        hook = subprocess.Popen(
            [sys.executable, "-m", "tensorferry", "preload", uri, "--wait", "-q",
             "--socket", str(crashed.socket), "--retry-for", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.5)  # the hook is retrying while the daemon is down
        assert hook.poll() is None
        proxy.set_fault(None)
        with running_daemon(env, allow=allow, socket=crashed.socket) as restarted:
            out, err = hook.communicate(timeout=60)
            assert hook.returncode == 0, err
            assert out.startswith("resident: ")
            assert "waiting for the daemon: tensorferry daemon is not running" in err
            # ...until the next start swept them, lock included. (Which daemon swept is
            # not asserted: any daemon starting on this host, e.g. another test run,
            # sweeps dead instances too.)
            assert crashed.segments() == []
            assert not (SHM / f"tensorferry.{crashed.instance}.lock").exists()
        assert "resource_tracker" not in crashed.output() + restarted.output()
        shutil.rmtree(crashed.log.parent, ignore_errors=True)


def test_freed_arenas_are_recycled_except_after_an_early_release(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    from safetensors.torch import load_file

    from tests.conftest import SHM, assert_same_tensors

    uris, wants = [], []
    for seed in (1, 2, 3):
        write_model(tmp_path / f"m{seed}", 3 << 20, layer_bytes=1 << 20, seed=seed)
        uris.append(upload(s3, tmp_path / f"m{seed}", f"{prefix}{seed}/"))
        wants.append(load_file(tmp_path / f"m{seed}" / "model.safetensors"))
    with running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"]) as d, d.client() as client:
        no_lease = "the worker's lease ends after its views are gone"
        with client.load(uris[0]) as model:
            assert_same_tensors(model.tensors, wants[0])
        # The daemon sees the stream end a moment after the block: wait for it, or the
        # evicted arena is still leased and not yet in the recycle pool.
        eventually(lambda: client.list()[0].leases == 0, no_lease)
        client.evict(uris[0])
        free = sorted(SHM.glob(f"tensorferry.{d.instance}.free*"))
        assert len(free) == 1
        assert client.status().recycled_bytes == free[0].stat().st_size
        with client.load(uris[1]) as model:  # lands in the recycled pages
            assert not free[0].exists()
            assert client.status().recycled_bytes == 0
            assert_same_tensors(model.tensors, wants[1])
            model_id = model.model_id
        eventually(lambda: client.list()[0].leases == 0, no_lease)
        # An explicit Release while a view lives: that arena is unlinked, never reused.
        client.evict(model_id)
        model = client.load(uris[2])  # takes m2's freed pages
        kept = model.tensors["layers.0.weight"]
        client.release(model.lease_id)
        client.evict(uris[2])
        eventually(lambda: client.list() == [], "the released, evicted model is freed")
        assert list(SHM.glob(f"tensorferry.{d.instance}.free*")) == []  # unlinked, not kept
        assert client.status().recycled_bytes == 0
        want = {"w": wants[2]["layers.0.weight"]}
        assert_same_tensors({"w": kept}, want)
        with client.load(uris[0]) as again:  # fresh pages: m3's view is untouched
            assert_same_tensors(again.tensors, wants[0])
        assert_same_tensors({"w": kept}, want)
        del kept, model


def test_unleased_models_are_evicted_least_recently_used_first(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    from tensorferry.errors import ResourceExhausted

    uris = {}
    for name in "abc":
        write_model(tmp_path / name, 3 << 20, layer_bytes=1 << 20, seed=ord(name))
        uris[name] = upload(s3, tmp_path / name, f"{prefix}{name}/")
    budget = '[memory]\nshm_budget = "8MiB"\n'
    with (
        running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], extra_config=budget) as d,
        d.client() as client,
    ):
        for name in "aba":  # a is used after b: b is the least recently used
            with client.load(uris[name]):
                pass
        with client.load(uris["c"]) as c:
            assert sorted(m.uri for m in client.list()) == [uris["a"], uris["c"]]
            with client.load(uris["a"]) as a, pytest.raises(ResourceExhausted) as info:
                client.load(uris["b"])  # both residents are leased: nothing to evict
            size = client.list()[0].bytes  # every arena here has the same size
            assert info.value.message == (
                f"loading {uris['b']} needs {size} bytes of shared memory but only "
                f"{(8 << 20) - 2 * size} are available (budget 8388608, in use {2 * size}); "
                "evict a model with `tensorferry evict` or raise [memory] shm_budget"
            )
            del a
        del c
        assert_clean(d)
