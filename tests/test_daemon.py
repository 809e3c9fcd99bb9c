"""Daemon process lifecycle: socket lock, allowlist requirement, clean SIGTERM, absent daemon."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tensorferry.client import Client, DaemonNotRunning
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import BUCKET, SHM, daemon_env, running_daemon, short_dir, start_daemon, upload


def test_second_daemon_on_the_same_socket_refuses(s3: S3Server) -> None:
    env = daemon_env(s3)
    with running_daemon(env, allow=[f"s3://{BUCKET}/"]) as first:
        second = subprocess.run(
            [sys.executable, "-m", "tensorferry", "serve", "--socket", str(first.socket),
             "--allow", f"s3://{BUCKET}/"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2
        assert second.stderr.strip().endswith(
            f"tensorferry serve: another tensorferry daemon (pid {first.proc.pid}) is already "
            f"serving {first.socket}; stop it first or give this one another --socket"
        )
        with first.client() as client:  # the first one still serves
            assert client.status().pid == first.proc.pid


def test_serve_without_allowlist_refuses_to_start(s3: S3Server) -> None:
    socket = short_dir() / "tf.sock"
    result = subprocess.run(
        [sys.executable, "-m", "tensorferry", "serve", "--socket", str(socket)],
        env=daemon_env(s3), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        "tensorferry serve: no source allowlist configured: the daemon acts with this host's "
        "credentials for any local process that reaches its socket. Add [sources] allow = "
        '["s3://bucket/prefix/", "/models"] to the config, or pass --allow-any-source'
    ) in result.stderr
    assert not socket.exists()


def test_allow_any_source_is_explicit_and_logged(s3: S3Server) -> None:
    with running_daemon(daemon_env(s3), allow=[], args=("--allow-any-source",)) as d:
        pass
    assert "serving ANY source the daemon's credentials can read (--allow-any-source)" in (
        d.output()
    )


WORKER = textwrap.dedent(
    """
    import sys, time
    from tensorferry.client import Client
    with Client(sys.argv[1]) as client:
        model = client.load(sys.argv[2])
        total = sum(int(t.view(-1).view(__import__("torch").uint8).sum())
                    for t in model.tensors.values() if t.numel())
        print(len(model.tensors), total, flush=True)
        sys.stdin.read()  # hold the lease until the test closes stdin
    """
)


def test_sigterm_with_a_worker_attached_leaves_nothing_behind_without_adoption(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 3 << 20, shards=2, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    # [memory] adopt = true leaves sealed arenas for the next daemon (test_adoption.py).
    d = start_daemon(
        daemon_env(s3), allow=[f"s3://{BUCKET}/"], extra_config="[memory]\nadopt = false\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(d.socket), uri],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        count, _ = worker.stdout.readline().split()
        assert int(count) > 0
        with d.client() as client:
            assert client.list()[0].leases == 1
        assert d.segments() != []
        assert d.stop() == 0
        assert not d.socket.exists()
        assert not d.socket.with_name("tf.sock.lock").exists()
        assert list(SHM.glob(f"tensorferry.{d.instance}.*")) == []
    finally:
        worker.communicate("", timeout=30)
    assert worker.returncode == 0


def test_client_without_daemon_says_how_to_start_it() -> None:
    socket = short_dir() / "absent.sock"
    with Client(socket) as client, pytest.raises(DaemonNotRunning) as info:
        client.load("s3://bucket/model/")
    assert info.value.message.startswith(
        f"tensorferry daemon is not running at {socket}: start it with "
        f"`tensorferry serve --socket {socket}`"
    )
    assert info.value.code.name == "UNAVAILABLE"


def test_client_on_a_stale_socket_file_says_daemon_not_running() -> None:
    import socket as sock

    path = short_dir() / "stale.sock"
    s = sock.socket(sock.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: what a killed daemon leaves
    with Client(path) as client, pytest.raises(DaemonNotRunning) as info:
        client.status()
    assert info.value.message.startswith(f"tensorferry daemon is not running at {path}")
