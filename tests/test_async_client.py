"""`AsyncClient` does what `Client` does, awaited: every method, over the Unix socket and
over TCP with TLS, against a real daemon."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorferry.client import (
    AsyncClient,
    Client,
    DaemonNotRunning,
    LoadedModel,
    SourceNotFound,
    TlsConfig,
)
from tensorferry.client._core import LoadStream
from tensorferry.devtools.modelgen import write_model
from tensorferry.errors import DaemonUnavailable, FailedPrecondition, ModelNotFound
from tensorferry.v1 import tensorferry_pb2 as pb
from tests.conftest import assert_same_tensors, daemon_env, running_daemon, short_dir
from tests.test_access import free_port, pki  # noqa: F401 (pki: a fixture)


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_both_clients_offer_the_same_methods_with_the_same_arguments() -> None:
    sync, aio = public_methods(Client), public_methods(AsyncClient)
    assert sorted(sync) == sorted(aio)
    assert sorted(sync) == [
        "close", "evict", "list", "load", "preload", "read_file", "release", "status",
        "stream",
    ]  # fmt: skip
    for name in sync:
        if name == "stream":  # an async iterator over the same request, not a coroutine
            assert aio[name].parameters == sync[name].parameters
            assert (sync[name].return_annotation, aio[name].return_annotation) == (
                "TensorStream", "AsyncTensorStream",
            )  # fmt: skip
            continue
        assert aio[name] == sync[name], name
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
    assert inspect.signature(AsyncClient) == inspect.signature(Client)


def test_a_stream_that_lies_about_its_table_is_refused() -> None:
    stream = LoadStream(None)
    batch = pb.TensorBatch(tensors=[pb.TensorInfo(name="a")])
    assert stream.feed(pb.LoadEvent(tensors=batch)) is None
    with pytest.raises(DaemonUnavailable) as info:
        stream.feed(pb.LoadEvent(ready=pb.Ready(tensor_count=2)))
    assert str(info.value) == "the daemon announced 2 tensors but sent 1"


def model_dir(root: Path) -> tuple[str, dict[str, torch.Tensor]]:
    write_model(root / "m", 2 << 20, shards=2, layer_bytes=1 << 19)
    (root / "m" / "config.json").write_text('{"a": 1}')
    want: dict[str, torch.Tensor] = {}
    for f in sorted((root / "m").glob("*.safetensors")):
        want.update(load_file(f))
    return f"{root / 'm'}/", want


async def wait_lease_end(model: LoadedModel) -> str | None:
    deadline = time.monotonic() + 10
    while model.lease_end is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return model.lease_end


async def test_preload_list_read_file_load_release_evict(local_root: Path) -> None:
    uri, want = model_dir(local_root)
    seen: list[str] = []
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d:
        async with AsyncClient(d.socket) as client:
            ready = await client.preload(uri, progress=lambda s, done, total: seen.append(s))
            assert ready.lease_id == ""
            assert ready.tensor_count == len(want)
            assert seen
            [info] = await client.list()
            assert (info.model_id, info.state, info.leases) == (ready.model_id, "ready", 0)
            assert await client.read_file(uri, "config.json") == b'{"a": 1}'
            with pytest.raises(SourceNotFound) as missing:
                await client.read_file(uri, "nope.txt")
            assert str(missing.value) == (
                f"{uri}: no file 'nope.txt'; the files a source offers are listed in the ready "
                "event of Load"
            )
            model = await client.load(uri, client_name="async test")
            assert model.attached
            assert "config.json" in model.files
            assert_same_tensors(model.tensors, want)
            assert (await client.list())[0].lease_clients == ["async test"]
            assert await client.release(model.lease_id) is True
            assert await wait_lease_end(model) == "released"
            assert await client.release(model.lease_id) is False
            model.close()
            evicted = await client.evict(uri)
            assert list(evicted.evicted) == [ready.model_id]
            assert await client.list() == []
            with pytest.raises(ModelNotFound) as gone:
                await client.evict(uri)
            assert str(gone.value) == (
                f"no resident model '{uri}'; `tensorferry ls` lists model ids and URIs"
            )
        with pytest.raises(FailedPrecondition) as closed:
            await client.status()
        assert str(closed.value) == "this AsyncClient is closed"


async def test_a_load_that_outlasts_its_timeout(local_root: Path) -> None:
    uri, _ = model_dir(local_root)
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d:
        async with AsyncClient(d.socket) as client:
            with pytest.raises(DaemonUnavailable) as info:
                await client.load(uri, timeout=1e-6)
            assert str(info.value) == (
                f"{uri} was not resident within 1e-06 s; the load goes on in the daemon "
                "(see `tensorferry status`)"
            )


async def test_no_daemon_at_the_socket() -> None:
    socket = short_dir() / "tf.sock"
    async with AsyncClient(socket) as client:
        with pytest.raises(DaemonNotRunning) as info:
            await client.list()
    assert str(info.value) == (
        f"tensorferry daemon is not running at {socket}: start it with "
        f"`tensorferry serve --socket {socket}` (or `systemctl start tensorferryd`), "
        "or point TENSORFERRY_SOCKET at a running daemon's socket (no socket file)"
    )


async def test_over_tcp_with_tls_and_client_certificates(
    local_root: Path,
    tmp_path: Path,
    pki: dict[str, bytes],  # noqa: F811 (the fixture imported above)
) -> None:
    uri, want = model_dir(local_root)
    address = f"127.0.0.1:{free_port()}"
    tcp = (
        f'[tcp]\nlisten = "{address}"\ncert = "{tmp_path}/server.pem"\n'
        f'key = "{tmp_path}/server_key.pem"\nclient_ca = "{tmp_path}/ca.pem"\n'
    )
    tls = TlsConfig(pki["ca"], pki["worker_key"], pki["worker"])
    with running_daemon(daemon_env(None), allow=[str(local_root)], extra_config=tcp):
        async with AsyncClient(tcp=address, tls=tls) as client:
            assert client.socket == address
            await client.preload(uri)
            model = await client.load(uri)
            assert_same_tensors(model.tensors, want)
            assert await client.read_file(uri, "config.json") == b'{"a": 1}'
            assert [m.leases for m in (await client.status()).models] == [1]
            assert await client.release(model.lease_id) is True
            assert await wait_lease_end(model) == "released"
            model.close()
            assert list((await client.evict(uri)).evicted)
        async with AsyncClient(tcp=address, tls=TlsConfig(pki["ca"])) as client:
            with pytest.raises(DaemonNotRunning):
                await client.list()  # the handshake fails: no usable connection
