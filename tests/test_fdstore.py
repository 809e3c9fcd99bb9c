"""systemd's file-descriptor store: the sd_notify FDSTORE protocol against a stand-in of
systemd (devtools/fdstore.py), and a daemon whose arenas it keeps through a SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorferry.client import Client
from tensorferry.daemon import systemd
from tensorferry.devtools.daemon import (
    kill_group,
    serve_argv,
    stop_group,
    wait_serving,
    write_config,
)
from tensorferry.devtools.fdstore import LAUNCHER, FdStoreStandIn
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server
from tests._adoption_helpers import TIMEOUT, Worker, instance_files, segments, source_digest
from tests.conftest import SHM, daemon_env, eventually, short_dir, upload

#: Run by the stand-in: what this process was passed, as JSON on stdout.
CHILD = """
import fcntl, json, os, sys
from tensorferry.daemon import systemd
if sys.argv[1] == "take":
    got = {name: [fd] for name, fd in systemd.FdStore().take().items()}
else:
    got = systemd.listen_fds()
def describe(fd):
    st = os.fstat(fd)
    return [fd, st.st_ino, bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)]
def is_open(fd):
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFD) >= 0
    except OSError:
        return False
open_fds = [fd for fd in range(3, 64) if is_open(fd)]
print(json.dumps({
    "fds": {name: [describe(fd) for fd in fds] for name, fds in got.items()},
    "open": open_fds,
    "listen_env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "again": systemd.listen_fds(),
}))
systemd.notify("READY=1")
"""


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short directory (the stand-in's children get files from it), removed afterwards."""
    directory = short_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def run_child(sd: FdStoreStandIn, mode: str, tmp: Path) -> dict[str, object]:
    log = tmp / f"child-{mode}.log"
    proc = sd.spawn([sys.executable, "-c", CHILD, mode], dict(os.environ), log=log)
    assert proc.wait(30) == 0, log.read_text()
    assert sd.ready.wait(TIMEOUT)  # the receiver may not have read it yet
    report: dict[str, object] = json.loads(log.read_text().splitlines()[-1])
    return report


def open_file(directory: Path, name: str) -> tuple[int, int]:
    path = directory / name
    path.write_bytes(name.encode())
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    return fd, os.fstat(fd).st_ino


def test_stored_descriptors_come_back_with_listen_fds(
    monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> None:
    with FdStoreStandIn() as sd:
        monkeypatch.setenv("NOTIFY_SOCKET", sd.notify_socket)
        store = systemd.FdStore()
        assert store.enabled
        (a, ino_a), (b, ino_b), (c, ino_c) = (open_file(tmp, n) for n in "abc")
        try:
            assert store.store("tensorferry.i.a", a)
            assert store.store("tensorferry.i.b", b)
            assert store.store("tensorferry.i.c", c)
            assert store.store("tensorferry.i.again", a)  # the same open file: systemd drops it
            assert store.remove("tensorferry.i.b")
            sd.wait(lambda: len(sd.messages()) == 5, "five datagrams")
        finally:
            for fd in (a, b, c):
                os.close(fd)  # systemd holds its own copies
        assert sd.names() == ["tensorferry.i.a", "tensorferry.i.c"]
        assert [m.fields for m in sd.messages()][-1] == {
            "FDSTOREREMOVE": "1", "FDNAME": "tensorferry.i.b",
        }  # fmt: skip
        report = run_child(sd, "listen", tmp)
        assert report["fds"] == {
            "tensorferry.i.a": [[3, ino_a, True]], "tensorferry.i.c": [[4, ino_c, True]],
        }  # fmt: skip
        assert report["open"] == [3, 4]
        assert report["listen_env"] == []  # a process the daemon starts does not see them
        assert report["again"] == {}
        assert ino_b not in {ino_a, ino_c}


def test_take_keeps_the_first_descriptor_of_each_name(
    monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> None:
    with FdStoreStandIn() as sd:
        monkeypatch.setenv("NOTIFY_SOCKET", sd.notify_socket)
        (a, ino_a), (b, _) = open_file(tmp, "a"), open_file(tmp, "b")
        assert systemd.FdStore().store("x", a)
        assert systemd.FdStore().store("x", b)
        os.close(a)
        os.close(b)
        sd.wait(lambda: sd.names() == ["x", "x"], "both stored under one name")
        report = run_child(sd, "take", tmp)
        assert report["fds"] == {"x": [[3, ino_a, True]]}
        assert report["open"] == [3]  # the second one closed


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a:b", "a descriptor name may hold printable ASCII characters other than ':': 'a:b'"),
        ("a\nFDSTOREREMOVE=1", "a descriptor name may hold printable ASCII characters "
         "other than ':': 'a\\nFDSTOREREMOVE=1'"),
        ("é", "a descriptor name may hold printable ASCII characters other than ':': 'é'"),
        ("", "a descriptor name needs 1 to 255 characters: ''"),
        ("x" * 256, f"a descriptor name needs 1 to 255 characters: '{'x' * 256}'"),
    ],
)  # fmt: skip
def test_names_systemd_would_refuse_are_refused(name: str, message: str) -> None:
    store = systemd.FdStore(enabled=True)
    with pytest.raises(ValueError, match="a descriptor name") as store_error:
        store.store(name, 0)
    assert str(store_error.value) == message
    with pytest.raises(ValueError, match="a descriptor name") as remove_error:
        store.remove(name)
    assert str(remove_error.value) == message
    systemd.check_fdname("x" * 255)


def test_outside_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    store = systemd.FdStore()
    assert not store.enabled
    assert not store.store("name", 0)
    assert not store.remove("name")


def test_a_failed_send_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp / "nobody-listens"))
    assert not systemd.FdStore().store("tensorferry.i.a", 0)
    assert caplog.messages == [
        "could not send FDSTORE for tensorferry.i.a to systemd: [Errno 2] No such file or directory"
    ]


def test_an_abstract_notify_socket_gets_the_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tf-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        read, write = os.pipe()
        try:
            assert systemd.FdStore().store("tensorferry.i.a", read)
            data, fds, _, _ = socket.recv_fds(listener, 1024, 4)
        finally:
            os.close(read)
            os.close(write)
        for fd in fds:
            os.close(fd)
        assert (data, len(fds)) == (b"FDSTORE=1\nFDNAME=tensorferry.i.a", 1)


def test_listen_fds_of_another_process_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inherited from a parent that systemd started: fd 3 here is not the parent's.
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "tensorferry.i.a")
    assert systemd.listen_fds() == {}
    assert not any(k.startswith("LISTEN_") for k in os.environ)
    assert systemd.FdStore().take() == {}


def test_names_that_do_not_match_the_count_are_unknown() -> None:
    # Under systemd LISTEN_FDNAMES always matches; a mismatch is a hand-made environment.
    read, write = os.pipe()
    os.close(write)
    script = (
        "import json\nfrom tensorferry.daemon import systemd\n"
        "print(json.dumps(systemd.listen_fds()))"
    )
    launcher = [sys.executable, "-I", "-S", str(LAUNCHER), str(read)]  # sets LISTEN_PID
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}
    result = subprocess.run(
        [*launcher, sys.executable, "-c", script], env=env, pass_fds=[read],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    os.close(read)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"unknown": [3]}
    assert "LISTEN_FDNAMES names 2 descriptors but LISTEN_FDS passes 1" in result.stderr


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_the_descriptor_store_keeps_both_arenas_through_a_restart(
    s3: S3Server, tmp_path: Path, prefix: str, how: str
) -> None:
    uris, want = [], {}
    for seed in (1, 2):
        directory = tmp_path / f"m{seed}"
        write_model(directory, 2 << 20, layer_bytes=1 << 20, seed=seed)
        uris.append(upload(s3, directory, f"{prefix}{seed}/"))
        want[uris[-1]] = source_digest(directory)
    workdir = short_dir()
    sock = workdir / "tf.sock"
    log = workdir / "daemon.log"
    config = write_config(
        workdir, uris, prelude="shutdown_grace = 0\n", extra="[memory]\nadopt = true\n"
    )
    argv = serve_argv(config, sock)
    worker: Worker | None = None
    daemon: subprocess.Popen[bytes] | None = None
    instances: list[str] = []
    with CountingProxy(s3.endpoint) as proxy, FdStoreStandIn() as sd:
        env = daemon_env(s3, proxy.endpoint)
        try:
            daemon = sd.spawn(argv, env, log=log)
            instances.append(wait_serving(daemon, sock, log=log).instance_id)
            assert sd.ready.wait(TIMEOUT)
            worker = Worker(sock, uris, workdir / "worker.err")
            assert {m["uri"]: m["sha256"] for m in worker.loaded} == want
            sd.wait(lambda: len(sd.names()) == 2, "both arenas stored", TIMEOUT)
            stored = [m for m in sd.messages() if "FDSTORE" in m.fields]
            assert [m.fds for m in stored] == [1, 1]  # one FDSTORE per model, with its fd
            assert sorted(sd.names()) == segments(instances[0])

            if how == "sigkill":
                os.killpg(daemon.pid, signal.SIGKILL)  # as systemd does on a crash
                daemon.wait(TIMEOUT)
            else:  # systemctl restart: SIGTERM, and the store is preserved through the stop
                stop_group(daemon)
                assert daemon.returncode == 0, log.read_text()
                assert sd.stopping.wait(TIMEOUT)
            # The ready models' arenas stay in the store either way.
            assert sorted(sd.names()) == segments(instances[0])
            proxy.reset()
            daemon = sd.spawn(argv, env, log=log)
            first = wait_serving(daemon, sock, log=log)
            instances.append(first.instance_id)
            assert sd.ready.wait(TIMEOUT)
            # Resident at the first Status answer, before anyone asked for them.
            assert sorted((m.uri, m.state, m.adopted) for m in first.models) == [
                (uri, "ready", True) for uri in sorted(uris)
            ], log.read_text()
            assert first.adopted_models == 2
            # The store now keeps them under the new instance's names, and nothing else.
            sd.wait(
                lambda: sorted(sd.names()) == segments(instances[1]) == sorted(first.arenas),
                f"the store renamed: {sd.names()}",
            )  # fmt: skip
            assert instance_files(instances[0]) == []
            output = log.read_text()
            assert f"not adopting tensorferry.{instances[0]}." not in output, output
            assert "systemd kept the descriptor" not in output, output

            with Client(sock) as client:
                for uri in uris:
                    with client.load(uri) as model:
                        assert model.attached
            stats = proxy.stats()
            assert stats.requests[Kind.DATA_GET] == stats.body_bytes[Kind.DATA_GET] == 0
            assert {u: r["sha256"] for u, r in worker.digests().items()} == want
            with Client(sock) as client:  # the old worker's leases come back
                eventually(
                    lambda: [m.leases for m in client.status().models] == [1, 1],
                    f"leases re-established: {client.status().models}",
                )  # fmt: skip
            worker.close()
            worker = None

            names = sd.names()
            with Client(sock) as client:
                for uri in uris:
                    client.evict(uri)
            sd.wait(lambda: sd.names() == [], f"both removed from the store: {sd.names()}")
            removed = [m.fields["FDNAME"] for m in sd.messages() if "FDSTOREREMOVE" in m.fields]
            assert sorted(removed[-2:]) == sorted(names)
            stop_group(daemon)
            assert daemon.returncode == 0, log.read_text()
            assert instance_files(instances[1]) == []
            assert sd.names() == []
        finally:
            if worker is not None:
                worker.close()
            if daemon is not None and daemon.poll() is None:
                kill_group(daemon)
            for name in (n for i in instances for n in instance_files(i)):
                with contextlib.suppress(FileNotFoundError):
                    (SHM / name).unlink()
            shutil.rmtree(workdir, ignore_errors=True)
