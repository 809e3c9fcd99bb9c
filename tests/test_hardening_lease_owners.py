"""Leases under pressure (issue #14): bound to the process (or TCP connection) that holds
them, and an end the worker can tell apart (limits: test_hardening_leases.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tensorferry.client import AsyncClient, Client, TlsConfig
from tensorferry.errors import TensorferryError
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc
from tests._hardening_leases_helpers import local_daemon, wait_for, write_lease_model
from tests.conftest import Daemon
from tests.test_access import free_port, pki  # noqa: F401 (pki: a fixture)

# A worker in its own process: loads, prints its lease, then obeys commands on stdin
# ("release": release its own lease; anything: report how the lease ended).
WORKER = """
import sys, time
from tensorferry.client import Client

client = Client(sys.argv[1])
model = client.load(sys.argv[2])
print("lease", model.lease_id, flush=True)
for line in sys.stdin:
    if line.strip() == "release":
        print("released", client.release(model.lease_id), flush=True)
    deadline = time.monotonic() + 30
    while model.lease_end is None and time.monotonic() < deadline:
        time.sleep(0.02)
    print("ended", model.lease_end, flush=True)
"""


@pytest.fixture
def uri(local_root: Path) -> str:
    return write_lease_model(local_root)


@contextlib.contextmanager
def worker(daemon: Daemon, uri: str) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", WORKER, str(daemon.socket), uri],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            yield proc
        finally:
            proc.kill()


def said(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    return proc.stdout.readline().split()


def tell(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def test_release_from_another_process_is_denied(local_root: Path, uri: str) -> None:
    with local_daemon(local_root) as d, worker(d, uri) as w:
        kind, lease_id = said(w)
        assert kind == "lease"
        with d.client() as client:
            with pytest.raises(TensorferryError) as info:
                client.release(lease_id)
            assert type(info.value).__name__ == "LeaseNotOwned"
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.message == (
                f"lease {lease_id} is held by pid {w.pid} (uid {os.getuid()}); this call comes "
                f"from pid {os.getpid()} (uid {os.getuid()}): only the process that holds a "
                "lease can release it (it ends when that process closes the model or exits)"
            )
            # A call that does not identify its process at all (no peer token).
            request = pb.ReleaseRequest(lease_id=lease_id)
            with (
                grpc.insecure_channel(f"unix:{d.socket}") as channel,
                pytest.raises(grpc.RpcError) as raw,
            ):
                pb_grpc.LoaderStub(channel).Release(request, timeout=10)
            assert raw.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
            assert raw.value.details() == (  # type: ignore[attr-defined]
                f"lease {lease_id} is held by pid {w.pid} (uid {os.getuid()}); this call comes "
                "from an unidentified process: only the process that holds a lease can release "
                "it (it ends when that process closes the model or exits)"
            )
            assert [m.leases for m in client.list()] == [1]
            tell(w, "release")
            assert said(w) == ["released", "True"]
            assert said(w) == ["ended", "released"]
            wait_for(lambda: [m.leases for m in client.list()] == [0])


def test_over_tcp_a_lease_is_bound_to_its_connection(
    local_root: Path,
    uri: str,
    tmp_path: Path,
    pki: dict[str, bytes],  # noqa: F811 (the fixture imported above)
) -> None:
    address = f"127.0.0.1:{free_port()}"
    tcp = (
        f'[tcp]\nlisten = "{address}"\ncert = "{tmp_path}/server.pem"\n'
        f'key = "{tmp_path}/server_key.pem"\nclient_ca = "{tmp_path}/ca.pem"\n'
    )
    tls = TlsConfig(pki["ca"], pki["worker_key"], pki["worker"])
    with local_daemon(local_root, tcp), Client(tcp=address, tls=tls) as client:
        model = client.load(uri)
        credentials = grpc.ssl_channel_credentials(pki["ca"], pki["worker_key"], pki["worker"])
        # Its own subchannel pool: a connection of its own, as another process would have.
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.secure_channel(address, credentials, options=options) as other:
            request = pb.ReleaseRequest(lease_id=model.lease_id)
            with pytest.raises(grpc.RpcError) as raw:
                pb_grpc.LoaderStub(other).Release(request, timeout=10)
        assert raw.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert re.fullmatch(
            rf"lease {model.lease_id} is held by ipv4:127\.0\.0\.1:(\d+); this call comes from "
            r"ipv4:127\.0\.0\.1:(?!\1)\d+: only the process that holds a lease can release it "
            r"\(it ends when that process closes the model or exits\)",
            raw.value.details(),  # type: ignore[attr-defined]
        ), raw.value.details()  # type: ignore[attr-defined]
        assert client.release(model.lease_id) is True
        wait_for(lambda: model.lease_end == "released")
        model.close()


def test_worker_tells_a_release_from_a_shutdown(local_root: Path, uri: str) -> None:
    with local_daemon(local_root) as d:
        with d.client() as client:
            model = client.load(uri)
            assert model.lease_end is None
            assert client.release(model.lease_id) is True
            wait_for(lambda: model.lease_end is not None)
            assert model.lease_end == "released"
            model.close()
        with worker(d, uri) as w:
            assert said(w)[0] == "lease"
            channel = grpc.insecure_channel(f"unix:{d.socket}")
            raw = pb_grpc.LoaderStub(channel).Load(pb.LoadRequest(uri=uri))
            while next(raw).WhichOneof("event") != "ready":
                pass
            tell(w, "report")
            peer = Path(f"{d.socket}.peer")
            assert peer.stat().st_mode & 0o777 == 0o660  # the socket's mode
            assert d.stop() == 0
            assert not peer.exists()
            assert said(w) == ["ended", "shutdown"]
            assert raw.code() == grpc.StatusCode.UNAVAILABLE
            assert raw.details() == (
                "the tensorferry daemon is shutting down: this lease has ended; load the "
                "model again once the daemon is back"
            )
            assert ("tensorferry-lease-end", "shutdown") in raw.trailing_metadata()
            channel.close()


async def test_the_async_client_releases_its_lease_and_sees_why_it_ended(
    local_root: Path, uri: str
) -> None:
    with local_daemon(local_root) as d:
        async with AsyncClient(d.socket) as client:
            model = await client.load(uri)
            assert model.lease_end is None
            assert await client.release(model.lease_id) is True
            deadline = time.monotonic() + 10
            while model.lease_end is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert model.lease_end == "released"
            assert (await client.status()).models[0].leases == 0
            model.close()
