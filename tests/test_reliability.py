"""Version pinning, cancellation and limits: each refusal with its status and message."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import ResourceExhausted, SourceChanged
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc
from tests.conftest import BUCKET, assert_clean, daemon_env, running_daemon, upload

WORKER = str(Path(__file__).with_name("worker.py"))
SLOW = 'chunk_size = "1MiB"\nconcurrency = 2'


def test_object_replaced_mid_load_fails_cleanly(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 6 << 20, layer_bytes=1 << 20)
    write_model(tmp_path / "v2", 6 << 20, layer_bytes=1 << 20, seed=2)  # same layout
    uri = upload(s3, tmp_path / "m", prefix)
    key = f"{prefix}model.safetensors"
    replaced = threading.Event()

    def replace_on_third_data_get(req: RequestInfo) -> Fault | None:
        if req.kind is Kind.DATA_GET and not replaced.is_set():
            seen = sum(1 for r in proxy.stats().log if r.kind is Kind.DATA_GET)
            if seen >= 3:  # after at least one data GET succeeded
                client = s3.client()
                client.upload_file(str(tmp_path / "v2" / "model.safetensors"), BUCKET, key)
                client.close()
                replaced.set()
        return None

    with (
        CountingProxy(s3.endpoint, fault=replace_on_third_data_get) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], s3_config=SLOW
        ) as d,
        d.client() as client,
    ):
        with pytest.raises(SourceChanged) as info:
            client.load(uri)
        assert replaced.is_set()
        assert info.value.code.name == "ABORTED"
        assert info.value.message == (
            f"{uri}model.safetensors was replaced while it was being loaded; load it again "
            "to get the new version"
        )
        assert d.segments() == []
        assert client.list() == []
        assert_clean(d)
        with client.load(uri) as model:  # the new version loads
            assert model.tensors


def test_disconnecting_worker_stops_the_fetch_unless_preloading(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 8 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)

    def slow(req: RequestInfo) -> Fault | None:
        return Fault(stall=0.3) if req.kind is Kind.DATA_GET else None

    with (
        CountingProxy(s3.endpoint, fault=slow) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], s3_config=SLOW
        ) as d,
    ):
        w = subprocess.Popen(
            [sys.executable, WORKER, str(d.socket), uri], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert w.stdout is not None
        while int(w.stdout.readline().split()[1]) == 0:
            pass
        w.send_signal(signal.SIGKILL)
        w.communicate()
        time.sleep(1.0)  # requests already sent may finish
        count = proxy.stats().requests[Kind.DATA_GET]
        time.sleep(1.5)
        assert proxy.stats().requests[Kind.DATA_GET] == count  # no new GETs
        assert count < 8
        with d.client() as client:
            assert client.list() == []
            assert client.status().recent_loads[-1].outcome == "cancelled"
        assert d.segments() == []
        # A preload whose caller goes away still finishes.
        pre = subprocess.Popen(
            [sys.executable, "-m", "tensorferry", "preload", uri, "--wait", "-q",
             "--socket", str(d.socket)],
        )  # fmt: skip
        time.sleep(0.8)
        pre.send_signal(signal.SIGKILL)
        pre.wait()
        deadline = time.monotonic() + 30
        with d.client() as client:
            while time.monotonic() < deadline and [m.state for m in client.list()] != ["ready"]:
                time.sleep(0.1)
            assert [m.state for m in client.list()] == ["ready"]
        assert_clean(d)


def test_limits_are_refused_with_numbers(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 2 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    limits = (
        '[limits]\nmax_model_bytes = "1MiB"\nmax_concurrent_rpcs = 3\nmax_request_bytes = "64KiB"\n'
    )
    with (
        running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], extra_config=limits) as d,
        d.client() as client,
    ):
        with pytest.raises(ResourceExhausted) as info:
            client.load(uri)
        size = info.value.message.split(" needs ")[1].split(" ")[0]
        assert int(size) > 1 << 20
        assert info.value.message == (
            f"{uri} needs {size} bytes, above this daemon's limit of 1048576 bytes "
            "([limits] max_model_bytes); load a selection of its tensors or raise the limit"
        )
        with client.load(uri, select=["layers.0.bias"]) as small:
            assert list(small.tensors) == ["layers.0.bias"]
        channel = grpc.insecure_channel(f"unix:{d.socket}")
        stub = pb_grpc.LoaderStub(channel)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.List(pb.ListRequest(), metadata=[("x", "y" * (128 << 10))], timeout=10)
        assert rpc.value.code() in (  # type: ignore[attr-defined]
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
        )  # fmt: skip
        big = pb.LoadRequest(uri=uri, select=["x" * 1000] * 100)  # ~100 KB > 64 KiB
        with pytest.raises(grpc.RpcError) as rpc:
            next(iter(stub.Load(big, timeout=10)))
        assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        held = [stub.Load(pb.LoadRequest(uri=uri, select=["layers.0.bias"])) for _ in range(3)]
        for call in held:  # three leases fill max_leases (max_concurrent_rpcs: its old name)
            while next(call).WhichOneof("event") != "ready":
                pass
        assert client.list()  # control calls have a limit of their own
        with pytest.raises(ResourceExhausted) as full:
            client.load(uri, select=["layers.0.bias"])
        assert full.value.message == (
            "3 leases are open on this daemon, its limit ([limits] max_leases = 3); each loaded "
            "model holds one until it is closed or released: release unused models or raise "
            "the limit"
        )
        for call in held:
            call.cancel()
        channel.close()


def test_concurrent_load_limits(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    uris = []
    for name in ("a", "b", "c"):
        write_model(tmp_path / name, 2 << 20, layer_bytes=1 << 20, seed=len(uris))
        uris.append(upload(s3, tmp_path / name, f"{prefix}{name}/"))

    def slow(req: RequestInfo) -> Fault | None:
        return Fault(stall=1.5) if req.kind is Kind.DATA_GET else None

    limits = "[limits]\nmax_concurrent_loads = 2\nmax_loads_per_client = 1\n"
    with (
        CountingProxy(s3.endpoint, fault=slow) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], extra_config=limits,
            s3_config=SLOW,
        ) as d,
        d.client() as client,
    ):  # fmt: skip
        done: list[str] = []

        def background(uri: str, name: str) -> None:
            with client.load(uri, client_name=name) as model:
                done.append(model.model_id)

        first = threading.Thread(target=background, args=(uris[0], "w1"))
        first.start()
        while not client.list():
            time.sleep(0.02)
        with pytest.raises(ResourceExhausted) as info:
            client.load(uris[1], client_name="w1")
        assert info.value.message == (
            "client 'w1' already has 1 loads fetching, the daemon's limit per client "
            "([limits] max_loads_per_client = 1); retry when one finishes"
        )
        second = threading.Thread(target=background, args=(uris[1], "w2"))
        second.start()
        while len(client.list()) < 2:
            time.sleep(0.02)
        with pytest.raises(ResourceExhausted) as info:
            client.load(uris[2], client_name="w3")
        assert info.value.message == (
            "2 loads are already fetching, the daemon's limit ([limits] max_concurrent_loads "
            "= 2); retry when one finishes"
        )
        first.join(30)
        second.join(30)
        assert len(done) == 2
        with client.load(uris[2], client_name="w3"):  # room again
            pass
        assert_clean(d)
