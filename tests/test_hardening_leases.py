"""Leases under pressure (issue #14): their own limit, admission classes for transfers and
control calls, and a cancelled GetFile that is no error (lease owners and ends:
test_hardening_lease_owners.py)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tensorferry.client import Client
from tensorferry.errors import ResourceExhausted
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc
from tests._hardening_leases_helpers import local_daemon, wait_for, write_lease_model


@pytest.fixture
def uri(local_root: Path) -> str:
    return write_lease_model(local_root)


def test_leases_have_their_own_limit_and_control_calls_still_work(
    local_root: Path, uri: str
) -> None:
    with local_daemon(local_root, "[limits]\nmax_leases = 3\n") as d, d.client() as client:
        held = [client.load(uri) for _ in range(3)]
        with pytest.raises(ResourceExhausted) as full:
            client.load(uri)
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert full.value.message == (
            "3 leases are open on this daemon, its limit ([limits] max_leases = 3); each "
            "loaded model holds one until it is closed or released: release unused models "
            "or raise the limit"
        )
        # Operators keep control while the leases are full.
        assert client.status().models[0].leases == 3
        assert client.list()[0].leases == 3
        assert client.release(held[0].lease_id) is True
        wait_for(lambda: client.list()[0].leases == 2)
        held.append(client.load(uri))  # the released slot is free again
        assert client.evict(uri).evicted == [held[0].model_id]
        for model in held:
            model.close()


def test_the_old_max_concurrent_rpcs_key_limits_leases_only(local_root: Path, uri: str) -> None:
    with local_daemon(local_root, "[limits]\nmax_concurrent_rpcs = 2\n") as d, d.client() as client:
        held = [client.load(uri) for _ in range(2)]
        assert [m.leases for m in client.list()] == [2]  # was refused: "2 calls are open"
        assert client.status().models[0].leases == 2
        with pytest.raises(ResourceExhausted) as full:
            client.load(uri)
        assert full.value.message.startswith(
            "2 leases are open on this daemon, its limit ([limits] max_leases = 2); "
        )
        for model in held:
            model.close()


def test_getfile_and_preload_are_admitted_as_transfers(local_root: Path, uri: str) -> None:
    limits = "[limits]\nmax_transfer_calls = 1\n"
    with local_daemon(local_root, limits) as d, d.client() as client:
        channel = grpc.insecure_channel(f"unix:{d.socket}")
        stalled = pb_grpc.LoaderStub(channel).GetFile(pb.GetFileRequest(uri=uri, name="blob.bin"))
        assert next(stalled).offset == 0  # then stop reading: the call stays open
        message = (
            "1 Preload and GetFile calls are open on this daemon, its limit ([limits] "
            "max_transfer_calls = 1); retry when one ends or raise the limit"
        )
        with pytest.raises(ResourceExhausted) as full:
            client.read_file(uri, "config.json")
        assert full.value.message == message
        with pytest.raises(ResourceExhausted) as full:
            client.preload(uri)
        assert full.value.message == message
        assert client.status().models == []  # control calls are a class of their own
        stalled.cancel()
        channel.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.read_file(uri, "config.json") == b"{}"
                break
            except ResourceExhausted:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_control_calls_have_a_cap_of_their_own() -> None:
    from tensorferry.daemon.config.settings import Limits
    from tensorferry.daemon.rpc.admission import Admission, CallKind

    gate = Admission(Limits(max_control_calls=1, max_leases=1))
    with (
        gate.admitted(CallKind.LEASE),
        gate.admitted(CallKind.CONTROL),
        pytest.raises(ResourceExhausted) as full,
        gate.admitted(CallKind.CONTROL),
    ):
        pass
    assert full.value.message == (
        "1 control calls (Status, List, Release, Evict) are open on this daemon, its limit "
        "([limits] max_control_calls = 1); retry in a moment or raise the limit"
    )


def test_a_getfile_its_client_gave_up_on_is_no_error(local_root: Path, uri: str) -> None:
    with local_daemon(local_root) as d:
        channel = grpc.insecure_channel(f"unix:{d.socket}")
        stub = pb_grpc.LoaderStub(channel)
        # Each way, several times: whether gRPC or the handler sees it first is a race.
        for how in ["cancel", "deadline"] * 3:
            call = stub.GetFile(
                pb.GetFileRequest(uri=uri, name="blob.bin"),
                timeout=0.5 if how == "deadline" else None,
            )
            assert next(call).offset == 0  # then stop reading
            if how == "cancel":
                call.cancel()
            assert call.code() == (
                grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
            )
        channel.close()
        with Client(d.socket) as client:
            # The abandoned calls have ended: their admission slots are back.
            wait_for(lambda: client.read_file(uri, "config.json") == b"{}")
        assert d.stop() == 0
        log = d.output()
        assert "ERROR" not in log, log
        assert "Traceback" not in log, log


def test_every_rpc_of_the_service_has_an_admission_class() -> None:
    from tensorferry.daemon.rpc.admission import KINDS
    from tensorferry.v1 import tensorferry_pb2 as pb

    methods = pb.DESCRIPTOR.services_by_name["Loader"].methods_by_name
    assert sorted(KINDS) == sorted(methods)
