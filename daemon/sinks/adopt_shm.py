"""Adopting a dead daemon's sealed CPU arenas at start (the sink side; see ``sealed.py``).

The start-up sweep (``ShmNames.sweep``) offers each dead instance's files to ``Claim``
while it holds that instance's lock. A segment with a sealed manifest naming our socket is
linked under a fresh name of ours (the same inode: workers that map it see nothing) and
sealed again for that name; the sweep removes the rest as before. Claimed arenas wait,
open but unmapped, until ``daemon.adoption`` has checked their source: then the sink maps
them (``CpuShmSink.adopt``) or removes them (``CpuShmSink.discard``).

Under systemd the segments' descriptors come back from the file-descriptor store; one
that is still the file at its name stands in for opening that name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import re
from pathlib import Path
from typing import Protocol

from tensorferry.daemon.sinks.sealed import (
    NotAdoptable,
    OtherSocket,
    SealedArena,
    manifest_path,
    read_sealed,
)
from tensorferry.daemon.sinks.sealed import seal as write_manifest
from tensorferry.daemon.sinks.shm_names import PREFIX, ShmNames
from tensorferry.errors import FailedPrecondition

log = logging.getLogger(__name__)
#: A live segment's name (not a freed one, a manifest or a staging name).
_SEGMENT = re.compile(re.escape(PREFIX) + r"[0-9a-f]+\.[0-9a-f]{32}")


class FdStore(Protocol):
    """What the sink needs of ``daemon.systemd.FdStore`` (systemd's descriptor store)."""

    def store(self, name: str, fd: int) -> bool: ...
    def remove(self, name: str) -> bool: ...
    def take(self) -> dict[str, int]: ...


@dataclasses.dataclass(eq=False)
class Claimed:
    path: Path  # the segment, now under this daemon's instance name
    fd: int  # O_RDWR, CLOEXEC; owned until adopt() or discard()
    manifest: SealedArena


def _same(path: Path, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd))
    except FileNotFoundError:
        return False


def _may_return(socket: str) -> bool:
    """Whether the daemon of ``socket`` may start again: its lock file beside the socket is
    there (a daemon that keeps sealed arenas leaves it at exit; a crash leaves it too)."""
    return os.path.lexists(socket + ".lock")


class Claim:
    """The sweep's ``adopt`` callback: claims the sealed arenas of our socket."""

    def __init__(self, names: ShmNames, socket: str, fd_store: FdStore | None) -> None:
        self.names = names
        self.socket = socket
        self.fd_store = fd_store
        self.claimed: list[Claimed] = []
        #: Sealed arenas of another socket whose daemon may start again: left in place.
        self.left: set[Path] = set()
        #: systemd's descriptors by segment name; those whose file is still there.
        self._fds = fd_store.take() if fd_store is not None else {}
        self._present = {n for n, fd in self._fds.items() if _same(names.shm_dir / n, fd)}

    def __call__(self, instance: str, paths: list[Path]) -> set[Path]:
        listed = set(paths)
        taken: set[Path] = set()
        for path in paths:
            if _SEGMENT.fullmatch(path.name) and manifest_path(path) in listed:
                claimed = self._claim(path)
                if claimed is not None:
                    self.claimed.append(claimed)
                if claimed is not None or path in self.left:
                    taken |= {path, manifest_path(path)}
        return taken

    def _open(self, path: Path) -> int:
        fd = self._fds.get(path.name)
        if fd is not None and _same(path, fd):
            del self._fds[path.name]
            return fd
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _claim(self, path: Path) -> Claimed | None:
        new: Path | None = None
        try:
            fd = self._open(path)
        except OSError as exc:
            log.info("not adopting %s: it cannot be opened (%s)", path.name, exc.strerror)
            return None
        try:
            try:
                manifest = read_sealed(path, fd, socket=self.socket)
            except OtherSocket as exc:
                if not _may_return(exc.socket):
                    raise
                log.info("leaving the sealed arena %s to the daemon of %s (its lock file is "
                         "there: it may start again)", path.name, exc.socket)  # fmt: skip
                os.close(fd)
                self.left.add(path)
                return None
            new = self.names.rename(path)
            if not _same(new, fd):
                raise NotAdoptable("its segment was replaced while it was being adopted")
            write_manifest(new, fd, manifest)
        except (NotAdoptable, OSError, ValueError, FailedPrecondition) as exc:
            log.info("not adopting %s: %s", path.name, exc)
            os.close(fd)
            if new is not None:
                new.unlink(missing_ok=True)  # our name for it; the file itself is not ours
            self._forget(path.name)
            return None
        manifest_path(path).unlink(missing_ok=True)
        self._forget(path.name)
        if self.fd_store is not None:
            self.fd_store.store(new.name, fd)
        log.info("claimed the sealed arena %s of %s as %s", path.name, manifest.uri, new.name)
        return Claimed(new, fd, manifest)

    def _forget(self, name: str) -> None:
        if self.fd_store is not None and name in self._present:
            self.fd_store.remove(name)

    def close_rest(self) -> None:
        """Close systemd's descriptors that no claim took, and drop them from its store."""
        for name, fd in self._fds.items():
            if name not in self._present:
                log.warning(
                    "systemd kept the descriptor of %s but the file is gone from %s "
                    "(RemoveIPC=yes, or removed by hand): not adopted",
                    name, self.names.shm_dir,
                )  # fmt: skip
            if self.fd_store is not None:
                self.fd_store.remove(name)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def sweep(names: ShmNames, socket: str, adopt: bool, fd_store: FdStore | None) -> list[Claimed]:
    """Remove dead instances' files, claiming their sealed arenas of ``socket`` (``adopt``)."""
    # Adoption off: whatever systemd kept is dropped from its store (close_rest), or it
    # would hold that memory for ever while the files are swept.
    claim = Claim(names, socket, fd_store)
    try:
        names.sweep(adopt=claim if adopt else None)
    except BaseException:
        close_claimed(claim.claimed)
        raise
    finally:
        claim.close_rest()
    return claim.claimed


def close_claimed(claimed: list[Claimed]) -> None:
    """Close claimed arenas that were neither adopted nor discarded; their files stay."""
    for c in claimed:
        if c.fd >= 0:
            os.close(c.fd)
            c.fd = -1
    claimed.clear()


def seal_arena(path: Path, manifest: SealedArena, fd_store: FdStore | None) -> bool:
    """Write the manifest of our segment at ``path``; hand its descriptor to systemd."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("not sealing arena %s: %s", path.name, exc)
        return False
    try:
        write_manifest(path, fd, manifest)
    except (OSError, ValueError) as exc:
        log.warning("not sealing arena %s: %s", path.name, exc)
        os.close(fd)
        return False
    try:
        if fd_store is not None:
            fd_store.store(path.name, fd)
    except (OSError, ValueError) as exc:  # sealed all the same: systemd just does not hold it
        log.warning("arena %s not handed to systemd's descriptor store: %s", path.name, exc)
    finally:
        os.close(fd)
    return True


def reseal(path: Path, manifest: SealedArena) -> None:
    """Rewrite our manifest of the segment at ``path`` (replaced whole, atomically)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            write_manifest(path, fd, manifest, replace=True)
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:  # the old manifest stays: adopted, but unpinned
        log.warning("could not rewrite the manifest of arena %s: %s", path.name, exc)


def unseal(path: Path, fd_store: FdStore | None) -> None:
    """Before the segment goes: a manifest must never outlive (or be reused with) it."""
    manifest_path(path).unlink(missing_ok=True)
    if fd_store is not None:
        fd_store.remove(path.name)


def map_claimed(claimed: Claimed, mode: int, group: int) -> mmap.mmap:
    """Map a claimed segment, with this daemon's access rule; its descriptor is closed."""
    try:
        # The socket's mode or group may have changed with the config: workers of this
        # daemon must be able to open what it grants.
        os.fchmod(claimed.fd, mode)
        os.fchown(claimed.fd, -1, group)
        size = claimed.manifest.size
        return mmap.mmap(claimed.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(claimed.fd)
        claimed.fd = -1


def discard_claimed(claimed: Claimed, why: str, fd_store: FdStore | None) -> None:
    log.info("not adopting %s (%s): %s", claimed.path.name, claimed.manifest.uri, why)
    unseal(claimed.path, fd_store)
    claimed.path.unlink(missing_ok=True)
    if claimed.fd >= 0:
        with contextlib.suppress(OSError):
            os.close(claimed.fd)
        claimed.fd = -1
