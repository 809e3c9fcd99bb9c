"""Resident arenas outlive the daemon (issue #28): a daemon killed (SIGKILL to its group, as
systemd does on a crash) or stopped (SIGTERM) and started again on the same socket and config
adopts the sealed arenas of the dead instance before it answers anyone; nothing is fetched
again, workers' views stay as they were and their leases come back. What cannot be adopted
(half-written, changed at the source, no longer allowed, adoption off) is removed, never
served. Real SeaweedFS behind a CountingProxy, real daemons, real worker processes."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorferry.client import Client
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.v1 import tensorferry_pb2 as pb
from tests._adoption_helpers import (
    Fleet,
    inodes,
    instance_files,
    segment_sizes,
    segments,
    source_digest,
    tensor_bytes,
)
from tests.conftest import SHM, eventually, upload

# Two shards of 1 MiB layers: a few seconds' work on a loaded 2-core machine.
MODEL_BYTES = 4 << 20
ATTACH_LIMIT = 0.05  # seconds: the "attached within 50 ms of asking"
PROGRESS_WORKER = str(Path(__file__).with_name("worker.py"))


@pytest.fixture
def fleet(s3: S3Server) -> Iterator[Fleet]:
    with CountingProxy(s3.endpoint) as proxy:
        fleet = Fleet(s3, proxy)
        try:
            yield fleet
        finally:
            fleet.close()


def make_model(s3: S3Server, directory: Path, prefix: str, seed: int) -> tuple[str, str]:
    """A model uploaded under ``prefix`` (other bytes for another seed, same keys and sizes):
    its URI and digest."""
    write_model(directory, MODEL_BYTES, shards=2, layer_bytes=1 << 20, seed=seed)
    return upload(s3, directory, prefix), source_digest(directory)


def by_uri(status: pb.StatusResponse) -> dict[str, pb.ModelInfo]:
    return {m.uri: m for m in status.models}


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_restart_adopts_both_models_and_workers_keep_their_views(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str, how: str
) -> None:
    uri_a, want_a = make_model(s3, tmp_path / "a", prefix + "a/", seed=1)
    uri_b, want_b = make_model(s3, tmp_path / "b", prefix + "b/", seed=2)
    want = {uri_a: want_a, uri_b: want_b}
    allow = [uri_a, uri_b]
    first_daemon, _ = fleet.start(allow)
    old = [fleet.worker(first_daemon.socket, uri_a, uri_b) for _ in range(2)]
    for w in old:
        assert {m["uri"]: m["sha256"] for m in w.loaded} == want
    held = inodes(first_daemon.instance)
    assert len(held) == 2

    if how == "sigkill":
        first_daemon.kill_group()
    else:
        assert first_daemon.stop() == 0
        # A planned stop leaves exactly the sealed arenas of the ready models (and no lock).
        left = instance_files(first_daemon.instance)
        arenas = segments(first_daemon.instance)
        assert left == sorted([*arenas, *(f"{n}.sealed" for n in arenas)])
    assert inodes(first_daemon.instance) == held
    fleet.proxy.reset()
    d, first = fleet.start(allow, socket=first_daemon.socket)
    log = d.output

    # Resident at the first Status answer, before anyone asked for them.
    models = by_uri(first)
    assert sorted(models) == sorted(want), log()
    assert [(m.state, m.adopted) for m in models.values()] == [("ready", True)] * 2
    assert first.adopted_models == 2
    assert sorted(m.bytes for m in models.values()) == segment_sizes(list(first.arenas))
    assert first.adopted_bytes == sum(m.bytes for m in models.values())
    # The same files, now under the new instance; nothing of the dead one is left.
    assert inodes(d.instance) == held
    assert sorted(first.arenas) == segments(d.instance)
    assert instance_files(first_daemon.instance) == []
    assert fleet.proxy.stats().requests[Kind.DATA_GET] == 0
    # Operators see it.
    cli = [sys.executable, "-m", "tensorferry"]
    at = ["--socket", str(d.socket)]
    shown = subprocess.run([*cli, "status", *at], capture_output=True, text=True, timeout=60)
    gb = first.adopted_bytes / 1e9
    assert (
        f"  adopted at start: 2 models, {gb:.3f} GB (resident from the daemon before, "
        "not fetched)\n" in shown.stdout
    ), shown.stderr
    listed = subprocess.run([*cli, "ls", *at], capture_output=True, text=True, timeout=60)
    assert [line.endswith("\tadopted") for line in listed.stdout.splitlines()] == [True] * 2

    # The old workers' views are unchanged, and their leases come back.
    for w in old:
        assert {u: r["sha256"] for u, r in w.digests().items()} == want
    with d.client() as client:
        eventually(
            lambda: [m.leases for m in client.status().models] == [2, 2],
            f"both workers' leases on both models re-established: {client.status().models}",
        )
    for w in old:
        for report in w.digests().values():
            assert (report["lease_end"], report["lease_restores"]) == (None, 1)

    # A new worker attaches (its first load warms its channel: best of 3), fetching nothing.
    new = fleet.worker(d.socket)
    for uri, digest in want.items():
        result = new.attach(uri, 3)
        assert result["attached"] == [True] * 3
        assert result["sha256"] == digest
        best = min(result["wall"])
        print(f"{how}: attach {uri}: wall {result['wall']} daemon {result['seconds']}")
        assert best < ATTACH_LIMIT, result
    assert fleet.data_bytes() == 0
    assert fleet.proxy.stats().requests[Kind.DATA_GET] == 0

    for w in old:
        # The restart was an ordinary event for them: nothing on stderr, a clean exit.
        assert w.close() == (0, "")
    assert "Traceback" not in log(), log()


def test_a_half_written_arena_is_removed_not_served(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uri, want = make_model(s3, tmp_path / "m", prefix, seed=3)
    allow = [uri]
    data_gets = itertools.count(1)

    def hold_after_first(req: RequestInfo) -> Fault | None:
        # The first data GET lands, the rest wait: the arena stays half-written.
        if req.kind is Kind.DATA_GET and next(data_gets) > 1:
            return Fault(stall=60)
        return None

    fleet.proxy.set_fault(hold_after_first)
    crashed, _ = fleet.start(allow, s3_config='chunk_size = "1MiB"\nconcurrency = 1')
    loading = subprocess.Popen(
        [sys.executable, PROGRESS_WORKER, str(crashed.socket), uri],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert loading.stdout is not None
    while True:  # mid-load: some bytes are in the arena, not all
        fields = loading.stdout.readline().split()
        assert fields[:1] == ["progress"], fields
        if int(fields[1]) > 0:
            break
    with crashed.client() as client:
        assert [m.state for m in client.status().models] == ["loading"]
    half = segments(crashed.instance)
    assert len(half) == 1
    assert not any(n.endswith(".sealed") for n in instance_files(crashed.instance))
    crashed.kill_group()
    loading.communicate("", timeout=60)
    assert loading.returncode != 0
    fleet.proxy.set_fault(None)
    fleet.proxy.reset()

    d, first = fleet.start(allow, socket=crashed.socket)
    assert (list(first.models), first.adopted_models, first.adopted_bytes) == ([], 0, 0)
    assert instance_files(crashed.instance) == []
    assert not (SHM / half[0]).exists()
    new = fleet.worker(d.socket, uri)
    assert (new.loaded[0]["attached"], new.loaded[0]["sha256"]) == (False, want)
    assert fleet.data_bytes() >= tensor_bytes(tmp_path / "m")


def preload_then_kill(fleet: Fleet, allow: list[str], *uris: str) -> tuple[Path, str]:
    """A daemon with ``uris`` resident (sealed), killed: its socket and instance."""
    d, _ = fleet.start(allow)
    with Client(d.socket) as client:
        for uri in uris:
            client.preload(uri)
    eventually(
        lambda: len([n for n in instance_files(d.instance) if n.endswith(".sealed")]) == len(uris),
        "every ready arena sealed",
    )
    d.kill_group()
    return d.socket, d.instance


def test_an_object_replaced_at_the_source_is_fetched_again(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uri, old = make_model(s3, tmp_path / "old", prefix, seed=4)
    socket, dead = preload_then_kill(fleet, [uri], uri)
    # Other bytes under the same keys, of the same sizes, while no daemon runs.
    same_uri, new = make_model(s3, tmp_path / "new", prefix, seed=5)
    assert (same_uri, new != old) == (uri, True)
    fleet.proxy.reset()

    d, first = fleet.start([uri], socket=socket)
    assert (list(first.models), first.adopted_models, first.adopted_bytes) == ([], 0, 0)
    assert instance_files(dead) == []
    assert segments(d.instance) == []
    eventually(lambda: f"({uri}): its source changed" in d.output(), "the reason logged")
    w = fleet.worker(d.socket, uri)
    assert (w.loaded[0]["attached"], w.loaded[0]["sha256"]) == (False, new)
    assert fleet.data_bytes() >= tensor_bytes(tmp_path / "new")


def test_a_source_no_longer_allowed_is_not_adopted(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uri_a, _ = make_model(s3, tmp_path / "a", prefix + "a/", seed=6)
    uri_b, want_b = make_model(s3, tmp_path / "b", prefix + "b/", seed=7)
    socket, dead = preload_then_kill(fleet, [uri_a, uri_b], uri_a, uri_b)
    fleet.proxy.reset()

    d, first = fleet.start([uri_b], socket=socket)  # the config no longer allows uri_a
    assert [(m.uri, m.adopted) for m in first.models] == [(uri_b, True)]
    assert first.adopted_models == 1
    assert instance_files(dead) == []
    assert sorted(first.arenas) == segments(d.instance)
    assert len(first.arenas) == 1
    eventually(
        lambda: f"({uri_a}): its source is not allowed any more" in d.output(), "the reason logged"
    )
    w = fleet.worker(d.socket, uri_b)
    assert (w.loaded[0]["attached"], w.loaded[0]["sha256"]) == (True, want_b)
    assert fleet.proxy.stats().requests[Kind.DATA_GET] == 0


def test_adopt_off_adopts_nothing_and_leaves_nothing(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uri, _ = make_model(s3, tmp_path / "m", prefix, seed=8)
    socket, dead = preload_then_kill(fleet, [uri], uri)
    d, first = fleet.start([uri], socket=socket, extra_config="[memory]\nadopt = false\n")
    assert (list(first.models), first.adopted_models, first.adopted_bytes) == ([], 0, 0)
    assert instance_files(dead) == []
    with d.client() as client:
        client.preload(uri)
    assert len(segments(d.instance)) == 1
    # Stopped with adoption off, it leaves no file at all: no sealed arena waits for a successor.
    assert d.stop() == 0
    assert instance_files(d.instance) == []


def test_a_daemon_on_another_socket_leaves_the_sealed_arenas_for_their_own(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    """Two daemons on one host (another socket, another tenant, another test run): one
    starting while the other restarts must not sweep the sealed arenas it would adopt."""
    uri, _ = make_model(s3, tmp_path / "m", prefix, seed=9)
    socket, dead = preload_then_kill(fleet, [uri], uri)
    fleet.start([uri])  # another daemon, on a socket of its own, starts meanwhile
    assert [n for n in instance_files(dead) if n.endswith(".sealed")] != []
    d, first = fleet.start([uri], socket=socket)
    assert [(m.uri, m.adopted) for m in first.models] == [(uri, True)], d.output()


def test_a_model_evicted_while_a_worker_holds_it_is_not_adopted(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uri, want = make_model(s3, tmp_path / "m", prefix, seed=12)
    d, _ = fleet.start([uri])
    w = fleet.worker(d.socket, uri)
    assert {m["uri"]: m["sha256"] for m in w.loaded} == {uri: want}
    assert [n for n in instance_files(d.instance) if n.endswith(".sealed")] != []
    with d.client() as client:
        assert client.evict(uri).pending_leases == 1
    # Unsealed at once: its arena stays for the worker, but a crash must not bring it back.
    assert [n for n in instance_files(d.instance) if n.endswith(".sealed")] == []
    d.kill_group()
    _, first = fleet.start([uri], socket=d.socket)
    assert (list(first.models), first.adopted_models) == ([], 0)
    assert instance_files(d.instance) == []
    assert {u: r["sha256"] for u, r in w.digests().items()} == {uri: want}


def test_an_arena_whose_source_cannot_be_listed_stays_sealed_for_the_next_start(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uri, want = make_model(s3, tmp_path / "m", prefix, seed=13)
    socket, _ = preload_then_kill(fleet, [uri], uri)
    # The store unreachable while the daemon starts: not served, and not removed either.
    unreachable = {**fleet.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    d, first = fleet.start([uri], socket=socket, env=unreachable)
    assert (list(first.models), first.adopted_models) == ([], 0)
    assert "stays sealed for the daemon's next start" in d.output(), d.output()
    assert [n for n in instance_files(d.instance) if n.endswith(".sealed")] != []
    d.kill_group()
    fleet.proxy.reset()
    again, status = fleet.start([uri], socket=socket)
    assert [(m.uri, m.adopted) for m in status.models] == [(uri, True)], again.output()
    new = fleet.worker(again.socket)
    assert new.attach(uri, 1)["sha256"] == want
    assert fleet.data_bytes() == 0


def test_an_adopted_selection_attaches_with_no_get_and_another_selection_is_another_model(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uri, _ = make_model(s3, tmp_path / "m", prefix, seed=14)
    d, _ = fleet.start([uri])
    with Client(d.socket) as client:
        client.preload(uri, select=["layers.0.*"])
    eventually(
        lambda: [n for n in instance_files(d.instance) if n.endswith(".sealed")] != [],
        "the selection's arena sealed",
    )
    d.kill_group()
    fleet.proxy.reset()
    again, first = fleet.start([uri], socket=d.socket)
    assert [(m.uri, m.adopted) for m in first.models] == [(uri, True)]
    with Client(again.socket) as client:
        with client.load(uri, select=["layers.0.*"]) as model:
            assert model.attached
            assert sorted(model.tensors) == ["layers.0.bias", "layers.0.weight"]
        requests = fleet.proxy.stats().requests
        # The source's names were sealed with it: keying the selection read no header.
        assert (requests[Kind.HEADER_GET], requests[Kind.DATA_GET]) == (0, 0)
        # Another selection is another model: fetched, never served from the adopted one.
        with client.load(uri, select=["layers.1.*"]) as model:
            assert not model.attached
            assert sorted(model.tensors) == ["layers.1.bias", "layers.1.weight"]
    assert fleet.data_bytes() > 0


def test_a_pinned_model_stays_pinned_when_adopted(
    fleet: Fleet, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    early, _ = make_model(s3, tmp_path / "a", prefix + "a/", seed=15)
    late, _ = make_model(s3, tmp_path / "b", prefix + "b/", seed=16)
    d, _ = fleet.start([early, late])
    with Client(d.socket) as client:
        client.preload(early, pin=True)  # pinned before it is sealed
        client.preload(late)
        eventually(
            lambda: len([n for n in instance_files(d.instance) if n.endswith(".sealed")]) == 2,
            "both arenas sealed",
        )
        client.preload(late, pin=True)  # pinned once sealed: its manifest is rewritten
    d.kill_group()
    _, first = fleet.start([early, late], socket=d.socket)
    assert sorted((m.uri, m.adopted, m.pinned) for m in first.models) == [
        (early, True, True), (late, True, True)
    ]  # fmt: skip
