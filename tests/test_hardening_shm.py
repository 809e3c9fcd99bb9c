"""Issue #14: /dev/shm names other users cannot take, and instance locks no start-up sweep
can steal (nor socket locks a stopping daemon can hand to two successors)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tensorferry.client import Client, LoadedModel
from tensorferry.daemon import server
from tensorferry.daemon.sinks import shm_names
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink, ShmArena
from tensorferry.devtools.modelgen import write_model
from tensorferry.errors import FailedPrecondition
from tests.conftest import (
    SHM,
    Daemon,
    assert_same_tensors,
    daemon_env,
    running_daemon,
    start_daemon,
)

SETPRIV = shutil.which("setpriv")
AS_NOBODY = [str(SETPRIV), "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
_real_flock = fcntl.flock


def _can_run_as_nobody() -> bool:
    if SETPRIV is None or os.geteuid() != 0:
        return False
    return subprocess.run([*AS_NOBODY, "true"], capture_output=True).returncode == 0


as_nobody = pytest.mark.skipif(
    not _can_run_as_nobody(), reason="needs root and setpriv to run a process as nobody"
)


def _enter_now(sink: CpuShmSink) -> None:
    """``async with``'s entry, run to completion inside a synchronous hook (it never awaits)."""
    with pytest.raises(StopIteration):
        sink.__aenter__().send(None)


def _hook_flock(monkeypatch: pytest.MonkeyPatch, before_first: Callable[[int], None]) -> None:
    """Run ``before_first(fd)`` just before the next exclusive flock (once), then lock."""
    fired = False

    def flock(fd: int, op: int) -> None:
        nonlocal fired
        if not fired and op & fcntl.LOCK_EX:
            fired = True
            before_first(fd)
        _real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


# Defect 2: names in /dev/shm that another local user can take first.


@as_nobody
def test_names_taken_by_another_user_do_not_stop_cold_loads(local_root: Path) -> None:
    wants = []
    for seed in (1, 2, 3):
        write_model(local_root / f"m{seed}", 64 << 10, layer_bytes=16 << 10, seed=seed)
        wants.append(load_file(local_root / f"m{seed}" / "model.safetensors"))
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d, d.client() as client:
        # Every name the daemon used to create next, live segments and freed arenas alike.
        taken = [f"tensorferry.{d.instance}.{n}" for n in range(1, 21)]
        taken += [f"tensorferry.{d.instance}.free{n}" for n in range(1, 21)]
        script = 'cd /dev/shm && for n in "$@"; do echo mine > "$n"; done'
        subprocess.run([*AS_NOBODY, "sh", "-c", script, "sh", *taken], check=True)
        try:
            for seed, want in enumerate(wants, 1):
                with client.load(str(local_root / f"m{seed}")) as model:
                    assert_same_tensors(model.tensors, want)
                    (segment,) = [s for s in d.segments() if s not in taken]
                    read = subprocess.run(
                        [*AS_NOBODY, "head", "-c1", str(SHM / segment)],
                        capture_output=True, text=True,
                    )  # fmt: skip
                    assert read.returncode != 0
                    assert "Permission denied" in read.stderr
                client.evict(str(local_root / f"m{seed}"))  # its arena goes to the free pool
            for name in taken:  # nothing of the other user's was replaced or removed
                assert (SHM / name).read_text() == "mine\n"
                assert (SHM / name).stat().st_uid == 65534
        finally:
            for name in taken:
                (SHM / name).unlink(missing_ok=True)


async def test_a_name_collision_is_retried_and_replaces_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mib = 1 << 20
    async with CpuShmSink(tmp_path, recycle_budget=8 * mib) as sink:
        prefix = f"tensorferry.{sink.instance}."
        # The names the generator offers first, and the names the old counter would use.
        taken = [prefix + "1", prefix + "free2", prefix + "a" * 32, prefix + "free-" + "b" * 32]
        for name in taken:
            (tmp_path / name).write_text("not yours")
        offers = iter(["a" * 32, "c" * 32, "b" * 32, "d" * 32])
        monkeypatch.setattr(shm_names, "_token", lambda: next(offers), raising=False)
        first = sink.allocate(mib, "m1")
        assert first.name == prefix + "c" * 32
        first.view[:4] = b"old!"
        sink.release(first)  # renamed to a free-pool name: the taken one is skipped
        assert sorted(p.name for p in tmp_path.glob("*.free-*")) == [
            prefix + "free-" + "b" * 32,
            prefix + "free-" + "d" * 32,
        ]
        assert sink.recycled_bytes == mib
        monkeypatch.setattr(shm_names, "_token", lambda: "e" * 32)
        second = sink.allocate(mib, "m2")  # the freed pages, under a new name
        assert bytes(second.view[:4]) == b"old!"
        sink.release(second, recycle=False)
        for name in taken:
            assert (tmp_path / name).read_text() == "not yours"


async def test_names_that_are_always_taken_fail_the_load_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with CpuShmSink(tmp_path) as sink:
        (tmp_path / f"tensorferry.{sink.instance}.{'a' * 32}").write_text("not yours")
        monkeypatch.setattr(shm_names, "_token", lambda: "a" * 32, raising=False)
        with pytest.raises(FailedPrecondition) as err:
            sink.allocate(1 << 20, "m1")
        assert str(err.value) == (
            f"could not create a file in {tmp_path}: 8 random names in a row were taken; "
            "another user may be creating files there to block this daemon"
        )


# Defect 3: instance locks that a start-up sweep can remove from under their owner.


async def test_a_sweep_between_creating_and_locking_the_instance_lock_steals_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rival = CpuShmSink(tmp_path)
    # The rival daemon starts at the same moment: its sweep runs between our create and
    # our flock.
    _hook_flock(monkeypatch, lambda fd: rival.sweep())
    async with CpuShmSink(tmp_path) as sink:
        monkeypatch.undo()
        assert (tmp_path / f"tensorferry.{sink.instance}.lock").exists()
        arena = sink.allocate(1 << 20, "m1")
        async with CpuShmSink(tmp_path) as later:  # the next daemon to start
            assert later.sweep() == []
        assert arena.path.exists()
        sink.release(arena, recycle=False)
    assert list(tmp_path.glob("tensorferry.*")) == []


async def test_a_sweep_that_listed_the_locks_first_keeps_a_daemon_that_started_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweeper, started = CpuShmSink(tmp_path), CpuShmSink(tmp_path)
    arenas: list[ShmArena] = []
    real_glob = Path.glob

    def glob(self: Path, pattern: str) -> Iterator[Path]:
        found = list(real_glob(self, pattern))
        # Just after the sweep's first look, another daemon starts and loads (once: undo).
        monkeypatch.undo()
        _enter_now(started)
        arenas.append(started.allocate(1 << 20, "m1"))
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob)
    sweeper.sweep()
    assert arenas[0].path.exists()
    started.release(arenas[0], recycle=False)
    await started.__aexit__(None, None, None)


def test_a_sweep_leaves_a_lock_that_replaced_the_dead_one_it_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = tmp_path / "tensorferry.0a0b.lock"
    lock.write_text("")  # its daemon is dead: nobody holds it
    segment = tmp_path / "tensorferry.0a0b.1"
    segment.write_text("")
    holder: list[int] = []

    def replace(fd: int) -> None:
        # After the sweep opened the dead lock, a live one took its name (rename(2)).
        new = tmp_path / "new"
        holder.append(os.open(new, os.O_RDWR | os.O_CREAT, 0o600))
        _real_flock(holder[0], fcntl.LOCK_EX)
        os.rename(new, lock)

    _hook_flock(monkeypatch, replace)
    try:
        CpuShmSink(tmp_path).sweep()
        monkeypatch.undo()
        assert lock.exists()
        assert os.stat(lock).st_ino == os.fstat(holder[0]).st_ino
        assert segment.exists()
    finally:
        os.close(holder[0])


async def test_a_waiter_that_locks_an_unlinked_socket_lock_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket = tmp_path / "tf.sock"
    lock = tmp_path / "tf.sock.lock"
    lock.write_text("")
    third: list[int] = []

    def stopped_and_restarted(fd: int) -> None:
        # We opened the lock of a daemon that is stopping: it unlinks the file and lets go,
        # and a third daemon creates and locks a new one at that path.
        lock.unlink()
        third.append(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
        _real_flock(third[0], fcntl.LOCK_EX)
        os.write(third[0], b"4242\n")

    _hook_flock(monkeypatch, stopped_and_restarted)
    try:
        with pytest.raises(server.AlreadyRunning) as err:
            async with server.hold_socket_lock(socket):
                pass
        assert str(err.value) == (
            f"another tensorferry daemon (pid 4242) is already serving {socket}; stop it "
            "first or give this one another --socket"
        )
    finally:
        os.close(third[0])


ROUNDS, DAEMONS = 2, 8


def test_daemons_starting_at_once_keep_each_others_segments(local_root: Path) -> None:
    write_model(local_root / "m", 32 << 10, layer_bytes=8 << 10)
    uri = str(local_root / "m")
    want = load_file(local_root / "m" / "model.safetensors")
    env = daemon_env(None)
    with contextlib.ExitStack() as stack:
        held: list[tuple[Daemon, Client, LoadedModel]] = []
        for _ in range(ROUNDS):
            # All start together, while the earlier rounds hold leases on their models.
            batch = [start_daemon(env, allow=[str(local_root)], wait=False)
                     for _ in range(DAEMONS)]  # fmt: skip
            for d in batch:
                stack.callback(_stop, d)
            for d in batch:
                client = stack.enter_context(_client_when_up(d))
                model = stack.enter_context(client.load(uri))
                assert_same_tensors(model.tensors, want)
                held.append((d, client, model))
        for d, client, model in held:
            assert d.proc.poll() is None, d.output()
            status = client.status()
            assert [m.leases for m in status.models] == [1], d.output()
            assert sorted(status.arenas) == d.segments() != [], d.output()
            assert (SHM / f"tensorferry.{d.instance}.lock").exists()
            assert_same_tensors(model.tensors, want)
            with client.load(uri) as again:  # still resident: no new arena
                assert_same_tensors(again.tensors, want)
            assert sorted(status.arenas) == d.segments()


@contextlib.contextmanager
def _client_when_up(d: Daemon) -> Iterator[Client]:
    deadline = time.monotonic() + 60
    while not d.instance:
        assert d.proc.poll() is None, d.output()
        assert time.monotonic() < deadline, d.output()
        if d.socket.exists():
            with contextlib.suppress(Exception), d.client() as probe:
                d.instance = probe.status().instance_id
        time.sleep(0.05)
    with d.client() as client:
        yield client


def _stop(d: Daemon) -> None:
    d.stop()
    leftover = d.remove_sealed()  # sealed arenas stay for a next daemon ([memory] adopt)
    shutil.rmtree(d.log.parent, ignore_errors=True)
    assert leftover == []
