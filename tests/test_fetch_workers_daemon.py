"""Real daemons with ``[fetch] workers = 2`` against SeaweedFS: loads land byte-exact with
their GETs spread over both workers, a worker killed mid-load is replaced and the load
still completes, faults (resets, SlowDowns, a straggler to hedge) are handled as without
workers, and a stopped daemon leaves no worker process."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, FaultHook, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.devtools.tinyproxy import run_tinyproxy
from tests.conftest import (
    as_bytes,
    assert_clean,
    daemon_env,
    eventually,
    running_daemon,
    upload,
)
from tests.test_access import free_port
from tests.test_hedging import nth_data_get
from tests.test_proxy import fallbacks

WORKERS = "\n[fetch]\nworkers = 2\n"


def _want(directory: Path) -> dict[str, torch.Tensor]:
    want: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        want.update(load_file(f))
    return want


def _same(tensors: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return sorted(tensors) == sorted(want) and all(
        as_bytes(tensors[k]).equal(as_bytes(v)) for k, v in want.items()
    )


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaps, as in a container without an init, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_load_through_two_workers_is_byte_exact_and_spread_over_both(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 24 << 20, shards=2, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    config = 'chunk_size = "1MiB"\nconcurrency = 8\nmax_concurrency = 8' + WORKERS
    with running_daemon(daemon_env(s3), allow=[uri], s3_config=config) as d, d.client() as c:
        with c.load(uri) as model:
            assert _same(dict(model.tensors), _want(tmp_path / "m"))
        status = c.status()
        workers = status.fetch_workers
        assert [w.mode for w in workers] == ["process", "process"]
        assert all(w.gets > 0 for w in workers), workers
        assert sum(w.bytes for w in workers) == status.recent_loads[0].bytes
        assert all(w.cpu_seconds >= 0 and w.restarts == 0 for w in workers)
        pids = [w.pid for w in workers]
        assert status.pid not in pids
        assert all(_alive(p) for p in pids)
        assert_clean(d)
    assert d.proc.returncode == 0
    for pid in pids:  # stopped with the daemon, and reaped: not even a zombie is left
        assert not _alive(pid), f"fetch worker {pid} outlived the daemon"


def _trickle(req: RequestInfo) -> Fault | None:
    return Fault(trickle=0.02) if req.kind is Kind.DATA_GET else None


def test_a_worker_killed_mid_load_is_replaced_and_the_load_completes(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 16 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    # About 0.3 s per range, two at a time: the load is still going when the worker dies.
    config = 'chunk_size = "1MiB"\nconcurrency = 2\nmax_concurrency = 2\nhedge = false'
    with (
        CountingProxy(s3.endpoint, fault=_trickle) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[uri], s3_config=config + WORKERS
        ) as d,
        d.client() as c,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        done = threading.Event()

        def load() -> bool:
            with d.client() as mine, mine.load(uri) as model:
                done.set()
                return _same(dict(model.tensors), _want(tmp_path / "m"))

        loading = pool.submit(load)
        eventually(lambda: c.status().fetch_workers[0].gets >= 1, "worker 0 carried a GET")
        victim = c.status().fetch_workers[0].pid
        os.kill(victim, signal.SIGKILL)
        assert loading.result(timeout=60), "the load's bytes differ"
        assert done.is_set()
        eventually(lambda: c.status().fetch_workers[0].restarts == 1, "worker 0 restarted")
        status = c.status()
        [record] = status.recent_loads
        assert record.outcome == "ready"
        fresh = status.fetch_workers[0].pid
        assert fresh != victim
        assert _alive(fresh)
        said = f"fetch worker 0 (pid {victim}) exited with status -9; starting another"
        assert said in d.output()
        assert_clean(d)


class _Faults:
    """Resets mid-body and SlowDowns on the 3rd to 8th data GETs."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET:
            return None
        with self.lock:
            self.n += 1
            if 3 <= self.n <= 5:
                return Fault(reset_after=100_000)
            if 6 <= self.n <= 8:
                return Fault(status=503, s3_code="SlowDown")
        return None


@pytest.mark.parametrize("case", ["resets and SlowDowns", "a straggler"])
def test_faults_are_handled_through_workers(
    s3: S3Server, tmp_path: Path, prefix: str, case: str
) -> None:
    write_model(tmp_path / "m", 24 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    hook: FaultHook
    if case == "a straggler":
        hook, seen = nth_data_get(12, Fault(truncate_after=0, hang=True))
        config = 'chunk_size = "1MiB"\nconcurrency = 2\nmax_concurrency = 2\nread_timeout = 60'
    else:
        hook = _Faults()
        config = 'chunk_size = "1MiB"\nconcurrency = 4\nmax_concurrency = 4\nread_timeout = 5'
    with (
        CountingProxy(s3.endpoint, fault=hook) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[uri], s3_config=config + WORKERS
        ) as d,
        d.client() as c,
    ):
        with c.load(uri) as model:
            assert _same(dict(model.tensors), _want(tmp_path / "m"))
        [record] = c.status().recent_loads
        assert all(w.gets > 0 for w in c.status().fetch_workers)
        assert_clean(d)
    assert record.outcome == "ready"
    if case == "a straggler":
        # The hung GET is a worker's; the hedge reads into a spare buffer in the daemon.
        assert (record.hedges, record.retries) == (1, 0)
        assert seen.count(seen[11]) == 2
    else:
        # Each retried on whichever worker was least busy then.
        assert dict(record.retry_causes) == {"http-5": 3, "connection": 3}
        assert record.retries == 6


def test_workers_die_with_a_killed_daemon(s3: S3Server, prefix: str) -> None:
    """A daemon killed outright (no shutdown of its own) leaves no worker behind."""
    with running_daemon(daemon_env(s3), allow=[f"s3://models/{prefix}"], s3_config=WORKERS) as d:
        with d.client() as c:
            pids = [w.pid for w in c.status().fetch_workers]
        assert len(pids) == 2
        assert all(_alive(p) for p in pids)
        d.proc.kill()
        d.proc.wait()
        eventually(lambda: not any(_alive(p) for p in pids), "the workers died with the daemon")


def test_a_range_the_proxy_fails_is_asked_of_the_store_by_the_worker_and_counted(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    """The fallback happens in the worker; the daemon's metrics count it, and show each
    worker's GETs, bytes and CPU."""
    write_model(tmp_path / "m", 8 << 20, shards=2, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    port = free_port()
    with (
        run_tinyproxy(tmp_path / "tp", deny_urls=r"-of-[0-9]+\.safetensors") as proxy,
        running_daemon(
            daemon_env(s3), allow=[uri],
            s3_config=f'chunk_size = "1MiB"\nproxy = "{proxy.endpoint}"' + WORKERS,
            extra_config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
        ) as d,
        d.client() as c,
    ):  # fmt: skip
        with c.load(uri) as model:
            assert _same(dict(model.tensors), _want(tmp_path / "m"))
        workers = c.status().fetch_workers
        carried = sum(w.gets for w in workers)
        refused = [t for _, t in proxy.requests() if "-of-" in t]
        assert carried >= 8
        assert fallbacks(port) == len(refused) >= carried
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for w in workers:
            assert f'tensorferry_fetch_worker_gets_total{{worker="{w.index}"}} {float(w.gets)}' in (
                text
            )
        assert_clean(d)
