"""Names and life of a daemon's files in /dev/shm: segments, the instance lock, the sweep.

Segments are named ``tensorferry.<instance>.<token>`` (freed ones kept for reuse
``tensorferry.<instance>.free-<token>``), with 128 random bits in each token: /dev/shm is
world-writable, and any local user could create a name we are about to use. A taken name is
skipped for another, and no name is ever renamed onto (rename(2) would replace the file).

Each daemon instance holds an flock on ``tensorferry.<instance>.lock`` for its whole life;
the lock is taken before the file gets that name, so no other daemon ever finds it free. At
start a daemon removes the files of every instance whose lock is free or gone: its owner is
dead. PIDs are not used, as they repeat across containers and restarts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from tensorferry.errors import FailedPrecondition

log = logging.getLogger(__name__)
PREFIX = "tensorferry."
FREE = "free-"
# With 128-bit names a taken one is another user's doing, never chance; give up after a few.
_NAME_ATTEMPTS = 8
#: Takes what it can of a dead instance's files (``adopt_shm``); returns the paths taken.
Adopt = Callable[[str, list[Path]], set[Path]]


def _token() -> str:
    return secrets.token_hex(16)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (not unlinked or replaced)."""
    try:
        return os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd))
    except FileNotFoundError:
        return False


class ShmNames:
    """This instance's names in ``shm_dir``, its lock there, and the sweep of dead ones."""

    def __init__(self, shm_dir: Path, mode: int) -> None:
        self.shm_dir = shm_dir
        self.mode = mode
        self.instance = secrets.token_hex(6)
        self._lock_fd: int | None = None

    @property
    def _lock_path(self) -> Path:
        return self.shm_dir / f"{PREFIX}{self.instance}.lock"

    def lock(self) -> None:
        """Lock a file under a name of its own, then link it into place, locked.

        Created and then locked at its final name, the lock would be free for a moment, and
        a daemon sweeping just then would take it for a dead one's and unlink it.
        """
        for _ in range(_NAME_ATTEMPTS):
            staging = self.shm_dir / f"{PREFIX}{self.instance}.locking-{_token()}"
            try:
                fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)  # fmt: skip
            except FileExistsError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.link(staging, self._lock_path)  # never replaces: EEXIST if taken
            except FileNotFoundError:
                # A sweep saw no lock for this instance yet and removed the staging name.
                os.close(fd)
                continue
            except FileExistsError:
                os.close(fd)
                self.instance = secrets.token_hex(6)
                continue
            except BaseException:
                os.close(fd)
                raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    staging.unlink()
            self._lock_fd = fd
            return
        raise self._names_taken()

    def _names_taken(self) -> FailedPrecondition:
        return FailedPrecondition(
            f"could not create a file in {self.shm_dir}: {_NAME_ATTEMPTS} random names in a "
            "row were taken; another user may be creating files there to block this daemon"
        )

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def sweep(self, adopt: Adopt | None = None) -> list[str]:
        """Remove the files of dead instances (their lock is free or gone).

        Files are listed before any lock is tested: a daemon's lock is in place, held,
        before it creates a segment, so a file listed here whose lock is gone or free when
        tested afterwards belongs to a daemon that has ended (or is the staging name of a
        lock not yet placed, which its daemon then makes again).

        ``adopt(instance, paths)`` is offered each dead instance's files (the lock aside)
        while its lock is held here; the paths it returns it has taken, and are kept.
        """
        files: dict[str, list[Path]] = {}
        for path in self.shm_dir.glob(f"{PREFIX}*.*"):
            instance = path.name[len(PREFIX) :].split(".", 1)[0]
            files.setdefault(instance, []).append(path)
        files.pop(self.instance, None)  # ours: alive (and locked) while we sweep
        removed: list[str] = []
        for instance, paths in files.items():
            lock = self.shm_dir / f"{PREFIX}{instance}.lock"
            try:
                # Another user's symlink or fifo under that name must not be followed.
                fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = None
            except OSError as exc:
                log.debug("not sweeping instance %s: %s", instance, exc)
                continue
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # alive
                    if not _same_file(fd, lock):
                        continue  # replaced since we opened it: that one is someone's
                taken = adopt(instance, [p for p in paths if p != lock]) if adopt else set()
                for path in paths:
                    if path != lock and path not in taken:
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                            removed.append(path.name)
                # Only a lock we hold: one absent a moment ago may belong to a daemon now.
                if fd is not None:
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
                        removed.append(lock.name)
            finally:
                if fd is not None:
                    os.close(fd)
        if removed:
            log.warning("removed %d stale shared-memory files of dead daemons", len(removed))
        return removed

    def new_path(self, kind: str = "") -> Path:
        return self.shm_dir / f"{PREFIX}{self.instance}.{kind}{_token()}"

    def create(self) -> tuple[int, Path]:
        """A new segment file under a fresh random name (another if one is taken)."""
        for _ in range(_NAME_ATTEMPTS):
            path = self.new_path()
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                return os.open(path, flags, self.mode), path
            except FileExistsError:
                log.warning("%s exists: another user created it; trying another name", path)
        raise self._names_taken()

    def rename(self, path: Path, kind: str = "") -> Path:
        """``path`` under a fresh random name; link(2), unlike rename(2), replaces nothing."""
        for _ in range(_NAME_ATTEMPTS):
            new = self.new_path(kind)
            try:
                os.link(path, new)
            except FileExistsError:
                log.warning("%s exists: another user created it; trying another name", new)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return new
        raise self._names_taken()
