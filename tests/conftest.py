"""Fixtures: one real SeaweedFS per test run, real daemons as subprocesses on real sockets.

Every test gets an isolated AWS environment (no host credentials, no metadata probes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorferry.client import Client
from tensorferry.devtools.daemon import (
    SHM,
    live_segments,
    remove_sealed,
    serve_argv,
    spawn_daemon,
    wait_serving,
    write_config,
)
from tensorferry.devtools.proxy import CountingProxy, FaultHook, Kind
from tensorferry.devtools.seaweed import S3Server, run_seaweed
from tensorferry.devtools.tls_store import TlsStore, run_seaweed_tls
from tensorferry.v1 import tensorferry_pb2 as pb

BUCKET = "models"
MISSING_BUCKET = "no-such-bucket"


@pytest.fixture(autouse=True)
def isolate_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        # A proxy set for this host's package downloads must not reach the daemons here.
        proxy = name.lower() in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
        if name.startswith("AWS_") or name.startswith("TENSORFERRY_") or proxy:
            monkeypatch.delenv(name)
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with run_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def s3_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStore]:
    """A second SeaweedFS that also serves https (its own TLS), with a throwaway CA."""
    with run_seaweed_tls(tmp_path_factory.mktemp("seaweed-tls")) as store:
        store.plain.create_bucket(BUCKET)
        yield store


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of its own for each test, in the shared bucket."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}/"


def upload(s3: S3Server, directory: Path, prefix: str, bucket: str = BUCKET) -> str:
    client = s3.client()
    for path in sorted(directory.iterdir()):
        client.upload_file(str(path), bucket, prefix + path.name)
    return f"s3://{bucket}/{prefix}"


def short_dir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))


@dataclasses.dataclass
class Daemon:
    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path
    instance: str = ""
    final_output: str | None = None

    def client(self) -> Client:
        return Client(self.socket)

    def output(self) -> str:
        if self.final_output is not None:
            return self.final_output
        return self.log.read_text(errors="replace")

    def segments(self) -> list[str]:
        return live_segments(self.instance)

    def remove_sealed(self) -> list[str]:
        """Remove the sealed arenas a stopped daemon left for the next one ([memory] adopt)
        and their manifests; the segments left WITHOUT a manifest (removed too: a test that
        fails on them must not leak them), which nothing adopts."""
        unsealed = remove_sealed(self.instance)
        for name in unsealed:
            (SHM / name).unlink(missing_ok=True)
        return unsealed

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill_group(self) -> None:
        """What systemd does on a crash or stop timeout: SIGKILL to the process group."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def daemon_env(s3: S3Server | None, endpoint: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if s3 is not None:
        env.update(s3.env())
        if endpoint is not None:
            env["AWS_ENDPOINT_URL"] = endpoint
    return env


def start_daemon(
    env: dict[str, str],
    *,
    allow: list[str],
    extra_config: str = "",
    s3_config: str = "",
    prelude: str = "",
    args: tuple[str, ...] = (),
    wait: bool = True,
    socket: Path | None = None,
) -> Daemon:
    workdir = short_dir()
    socket = socket or workdir / "tf.sock"
    if "shutdown_grace" not in prelude:
        prelude += "shutdown_grace = 0\n"  # tests hold leases; don't wait for them at exit
    config = write_config(workdir, allow, prelude=prelude, s3=s3_config, extra=extra_config)
    log = workdir / "daemon.log"
    daemon = Daemon(socket, spawn_daemon(config, socket, env, args=args, log=log), log)
    if wait:
        daemon.instance = wait_serving(daemon.proc, socket, log=log).instance_id
    return daemon


def serve_refused(config_text: str, env: dict[str, str]) -> tuple[str, Path]:
    """Run `serve` on a config that must be refused: it exits 2; returns stderr and the file."""
    config = short_dir() / "c.toml"
    config.write_text(config_text)
    result = subprocess.run(
        serve_argv(config, config.parent / "tf.sock"),
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    return result.stderr.strip(), config


@contextlib.contextmanager
def running_daemon(env: dict[str, str], **kwargs: Any) -> Iterator[Daemon]:
    daemon = start_daemon(env, **kwargs)
    try:
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
        # Sealed arenas stay for the next daemon on this socket, which no test starts.
        leftover = daemon.remove_sealed()
        daemon.final_output = daemon.output()
        shutil.rmtree(daemon.log.parent, ignore_errors=True)
        assert leftover == [], f"daemon left shared-memory segments: {leftover}"


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
def daemon(s3: S3Server, local_root: Path) -> Iterator[Daemon]:
    """A daemon allowed to read the shared bucket and this test's local model folder."""
    allow = [f"s3://{BUCKET}/", f"s3://{MISSING_BUCKET}/", str(local_root)]
    with running_daemon(daemon_env(s3), allow=allow) as d:
        yield d
        assert_clean(d)


def assert_clean(daemon: Daemon) -> None:
    """Nothing held after the test: no lease, no busy store connection, no stray arena."""
    deadline = time.monotonic() + 5
    with daemon.client() as client:
        # Leases end when the worker's call is cancelled; the daemon sees that a moment later.
        status = client.status()
        while any(m.leases for m in status.models) and time.monotonic() < deadline:
            time.sleep(0.02)
            status = client.status()
    assert [m.leases for m in status.models if m.leases] == []
    assert status.store_connections_busy == 0
    assert sorted(status.arenas) == daemon.segments()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        actual = got[name]
        assert actual.dtype == expected.dtype, name
        assert actual.shape == expected.shape, name
        assert torch.equal(as_bytes(actual), as_bytes(expected)), name


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait for a condition the daemon reaches asynchronously (a lease ending, a fetch
    stopping), with a deadline: never for timing luck, which a loaded machine breaks."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        time.sleep(0.02)


def load_once(s3: S3Server, uri: str, hook: FaultHook, config: str) -> tuple[pb.LoadRecord, int]:
    """One cold load through a CountingProxy with ``hook``: its record, and the data GETs
    the proxy saw."""
    with (
        CountingProxy(s3.endpoint, fault=hook) as proxy,
        running_daemon(daemon_env(s3, proxy.endpoint), allow=[uri], s3_config=config) as d,
        d.client() as client,
    ):
        with client.load(uri) as model:
            assert not model.attached
        [record] = client.status().recent_loads
        del model
        assert_clean(d)
    return record, proxy.stats().requests[Kind.DATA_GET]
