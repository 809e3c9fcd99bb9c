"""Workers do not notice a daemon restart (issue #28): the client re-establishes the lease
of each CPU model it holds once the daemon is back with the arena, and otherwise keeps its
views through its own mapping, without a lease; a restart logs at INFO, never higher."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tensorferry.client import AsyncClient
from tensorferry.devtools.modelgen import write_model
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc
from tests._hardening_leases_helpers import wait_for
from tests.adoption_worker import digest
from tests.conftest import Daemon, daemon_env, running_daemon

NO_ADOPT = "[memory]\nadopt = false\n"
# Holds one model; per stdin line, reports (as JSON) once a condition holds, or at 30 s:
# "ended" (no lease held), "restored" (held again, re-established at least once), "now".
WORKER = """
import json, logging, sys, time
sys.path.insert(0, sys.argv[3])
from tensorferry.client import Client
from tests.adoption_worker import digest

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
client = Client(sys.argv[1])
model = client.load(sys.argv[2])
conditions = {
    "ended": lambda: model.lease_end is not None,
    "restored": lambda: model.lease_end is None and model.lease_restores > 0,
    "now": lambda: True,
}
for line in sys.stdin:
    deadline = time.monotonic() + 30
    while not conditions[line.strip()]() and time.monotonic() < deadline:
        time.sleep(0.02)
    print(json.dumps({
        "sha256": digest(model.tensors), "lease_end": model.lease_end,
        "lease_restores": model.lease_restores, "model_id": model.model_id,
        "lease_id": model.lease_id,
    }), flush=True)
"""
ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def uri(local_root: Path) -> str:
    write_model(local_root / "m", 1 << 20, layer_bytes=1 << 18)
    return str(local_root / "m")


def restart(daemon: Daemon, local_root: Path, config: str = "") -> Any:
    """Stop ``daemon`` (SIGTERM) and start another on its socket."""
    assert daemon.stop() == 0
    return running_daemon(
        daemon_env(None), allow=[str(local_root)], socket=daemon.socket, extra_config=config
    )


class Worker:
    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log

    def ask(self, condition: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(condition + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.log.read_text()
        answer: dict[str, Any] = json.loads(line)
        return answer

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@contextlib.contextmanager
def worker(daemon: Daemon, uri: str, tmp_path: Path) -> Iterator[Worker]:
    log = tmp_path / "worker.log"
    env = {**os.environ, "TENSORFERRY_LEASE_RESTORE_SECONDS": "60"}
    with log.open("w") as err, subprocess.Popen(
        [sys.executable, "-c", WORKER, str(daemon.socket), uri, ROOT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
    ) as proc:  # fmt: skip
        try:
            yield Worker(proc, log)
        finally:
            proc.kill()


def only_info(lines: list[str]) -> None:
    assert [line for line in lines if line.startswith(("WARNING", "ERROR"))] == []


def test_a_resident_only_load_of_a_model_not_resident_starts_nothing(
    local_root: Path, uri: str
) -> None:
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d:
        with grpc.insecure_channel(f"unix:{d.socket}") as channel:
            request = pb.LoadRequest(uri=uri, resident_only=True)
            call = pb_grpc.LoaderStub(channel).Load(request, timeout=20)  # a lease never ends
            with pytest.raises(grpc.RpcError):
                list(call)
            assert call.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert call.details() == (  # the daemon names the source as it normalised it
                f"{uri}/ is not resident in this daemon; resident_only loads only attach "
                "(load it without resident_only to fetch it)"
            )
        with d.client() as client:
            assert list(client.status().models) == []
            assert client.list() == []


def test_a_restarted_daemon_without_the_arena_leaves_the_worker_its_views(
    local_root: Path, uri: str, tmp_path: Path
) -> None:
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d, worker(
        d, uri, tmp_path
    ) as w:  # fmt: skip
        before = w.ask("now")
        assert before["lease_end"] is None
        with restart(d, local_root, NO_ADOPT) as d2:
            gone = (
                f"INFO tensorferry.client._lease tensorferry daemon restarted without the "
                f"arena of {uri} (it does not hold the model): its tensors stay valid "
                "through this process's own mapping, with no lease"
            )
            wait_for(lambda: gone in w.lines(), timeout=30)
            after = w.ask("now")
            assert after["sha256"] == before["sha256"]
            assert after["lease_end"] == "shutdown"
            assert after["lease_restores"] == 0
            with d2.client() as client:
                assert list(client.status().models) == []  # the restore fetched nothing
            only_info(w.lines())


def test_the_lease_comes_back_when_the_daemon_adopted_the_arena(
    local_root: Path, uri: str, tmp_path: Path
) -> None:
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d, worker(
        d, uri, tmp_path
    ) as w:  # fmt: skip
        before = w.ask("now")
        with restart(d, local_root) as d2:
            after = w.ask("restored")
            assert (after["lease_end"], after["lease_restores"]) == (None, 1)
            assert after["sha256"] == before["sha256"]
            with d2.client() as client:
                (info,) = client.status().models
            assert (info.adopted, info.leases, info.model_id) == (True, 1, after["model_id"])
            assert after["lease_id"] != before["lease_id"]
            back = (
                f"INFO tensorferry.client._lease tensorferry daemon restarted: lease on {uri} "
                f"re-established (model {info.model_id})"
            )
            assert back in w.lines()
            # Again, through a crash this time ("lost"): the restored lease comes back too.
            d2.kill_group()
            with running_daemon(
                daemon_env(None), allow=[str(local_root)], socket=d.socket
            ) as d3:  # fmt: skip
                again = w.ask("restored")
                assert (again["lease_end"], again["lease_restores"]) == (None, 2)
                assert again["sha256"] == before["sha256"]
                with d3.client() as client:
                    (info,) = client.status().models
                assert (info.adopted, info.leases, info.model_id) == (True, 1, again["model_id"])
            only_info(w.lines())


async def test_the_async_client_gets_its_lease_back(
    local_root: Path, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORFERRY_LEASE_RESTORE_SECONDS", "60")
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d:
        async with AsyncClient(d.socket) as client:
            held = [await client.load(uri)]
            model = held[0]
            before = digest(model.tensors)
            with restart(d, local_root) as d2:
                await until(lambda: held[0].lease_restores == 1 and held[0].lease_end is None)
                assert digest(model.tensors) == before
                with d2.client() as sync:
                    (info,) = sync.status().models
                assert (info.leases, info.model_id) == (1, model.model_id)
                # The last view gone ends the re-established lease too.
                model.close()
                held.clear()
                del model
                await until(lambda: sync_leases(d2) == 0)


def sync_leases(daemon: Daemon) -> int:
    with daemon.client() as client:
        return sum(m.leases for m in client.status().models)


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    assert check(), "condition not reached in time"


def restoring() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tensorferry-lease-")]


def test_the_last_view_gone_stops_the_wait_for_the_daemon(
    local_root: Path, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORFERRY_LEASE_RESTORE_SECONDS", "60")
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d, d.client() as client:
        held = [client.load(uri)]
        assert d.stop() == 0
        wait_for(lambda: held[0].lease_end == "shutdown" and restoring() != [])
        (thread,) = restoring()
        held.clear()  # the last view goes: the lease ends, and with it the wait
        thread.join(5)
        assert not thread.is_alive()
