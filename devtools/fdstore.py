"""A stand-in of systemd for tests: the notify socket and the file-descriptor store.

``FdStoreStandIn`` binds a notify socket, reads the ``sd_notify`` datagrams of the processes
it spawns (READY=1, STOPPING=1, STATUS=, WATCHDOG=1, FDSTORE=1 and FDSTOREREMOVE=1 with
FDNAME=) with their SCM_RIGHTS descriptors, and keeps the stored descriptors by name as
systemd does for a unit with FileDescriptorStoreMax=: a descriptor that is the same open
file as one already stored is dropped, FDSTOREREMOVE closes every descriptor of its name.
``spawn`` starts a process with them, as systemd restarts a service: LISTEN_FDS from 3 on,
LISTEN_FDNAMES, LISTEN_PID the process's own pid (devtools/fdstore_exec.py), NOTIFY_SOCKET,
in a session of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tensorferry.devtools.daemon import kill_group

LAUNCHER = Path(__file__).resolve().with_name("fdstore_exec.py")
#: The kcmp(2) syscall, by machine: how systemd's same_fd() tells two descriptors of one open
#: file from two opens of one inode.
KCMP = {"x86_64": 312, "aarch64": 272}
KCMP_FILE = 0
#: Descriptors in one datagram: the kernel's SCM_MAX_FD.
MAX_FDS_PER_MESSAGE = 253


@dataclasses.dataclass(frozen=True)
class Message:
    """One datagram as received: its ``KEY=VALUE`` lines and how many descriptors came."""

    fields: dict[str, str]
    fds: int


def _fdname_is_valid(name: str) -> bool:
    # systemd's fdname_is_valid(): printable ASCII but ':', at most 255 (empty is allowed).
    return len(name) <= 255 and all(" " <= c <= "~" and c != ":" for c in name)


def _same_file(a: int, b: int) -> bool:
    """Whether ``a`` and ``b`` are one open file description (systemd's same_fd())."""
    number = KCMP.get(platform.machine())
    if number is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        pid = os.getpid()
        result = libc.syscall(number, pid, pid, KCMP_FILE, a, b)
        if result >= 0:
            return bool(result == 0)
    # Without kcmp: the same inode opened with the same flags.
    sa, sb = os.fstat(a), os.fstat(b)
    same_inode = (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    return same_inode and fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)


class FdStoreStandIn:
    """systemd's notify socket and descriptor store, for the processes ``spawn`` starts."""

    def __init__(self, max_fds: int = 4096) -> None:
        self.max_fds = max_fds  # FileDescriptorStoreMax=
        #: Set by READY=1; cleared by each spawn.
        self.ready = threading.Event()
        #: Set by STOPPING=1; cleared by each spawn.
        self.stopping = threading.Event()
        self.status = ""
        self.watchdog_pings = 0
        self._dir = Path(tempfile.mkdtemp(prefix="tf-sd-", dir="/tmp"))  # short: 107 bytes
        self._path = self._dir / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(self._path))
        self._changed = threading.Condition()
        self._stored: list[tuple[str, int]] = []
        self._messages: list[Message] = []
        self._closing = False
        self._spawned: list[subprocess.Popen[bytes]] = []
        self._thread = threading.Thread(target=self._receive, name="fdstore-stand-in", daemon=True)

    @property
    def notify_socket(self) -> str:
        """The value for $NOTIFY_SOCKET."""
        return str(self._path)

    def __enter__(self) -> FdStoreStandIn:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        # A process still running is killed as systemd does at the end of a stop timeout.
        for proc in self._spawned:
            if proc.poll() is None:
                kill_group(proc)
        with self._changed:
            self._closing = True
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as wake:
            wake.sendto(b"", str(self._path))
        self._thread.join(10)
        self._sock.close()
        with self._changed:
            for _, fd in self._stored:
                os.close(fd)
            self._stored.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def names(self) -> list[str]:
        """The name of each stored descriptor, in the order they were stored."""
        with self._changed:
            return [name for name, _ in self._stored]

    def messages(self) -> list[Message]:
        """Every datagram received so far."""
        with self._changed:
            return list(self._messages)

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Until ``check()`` holds; it is evaluated again after each datagram."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not reached within {timeout} s: {what}")
                self._changed.wait(min(left, 0.5))

    def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with the stored descriptors and this notify socket, in a session
        of its own (as devtools/daemon.py spawn_daemon); its output goes to ``log``."""
        self.ready.clear()
        self.stopping.clear()
        child_env = {k: v for k, v in env.items() if not k.startswith("LISTEN_")}
        child_env["NOTIFY_SOCKET"] = self.notify_socket
        with contextlib.ExitStack() as files, self._changed:
            # Under the lock: the receiver must not close a descriptor being passed.
            fds = [fd for _, fd in self._stored]
            if fds:
                child_env["LISTEN_FDS"] = str(len(fds))
                child_env["LISTEN_FDNAMES"] = ":".join(name for name, _ in self._stored)
            out = files.enter_context(open(log, "ab")) if log is not None else None
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER), ",".join(map(str, fds)), *argv],
                env=child_env, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT if out else None, start_new_session=True,
            )  # fmt: skip
        self._spawned.append(proc)
        return proc

    def _receive(self) -> None:
        while True:
            data, fds, flags, _ = socket.recv_fds(self._sock, 1 << 16, MAX_FDS_PER_MESSAGE)
            for fd in fds:
                os.set_inheritable(fd, False)
            with self._changed:
                if self._closing:
                    for fd in fds:
                        os.close(fd)
                    return
                fields = dict(
                    line.split("=", 1) for line in data.decode(errors="replace").split("\n")
                    if "=" in line
                )  # fmt: skip
                self._messages.append(Message(fields, len(fds)))
                if flags & socket.MSG_CTRUNC:  # systemd drops such a message's descriptors
                    fields = {k: v for k, v in fields.items() if not k.startswith("FDSTORE")}
                self._apply(fields, fds)
                self._changed.notify_all()

    def _apply(self, fields: dict[str, str], fds: list[int]) -> None:
        """One message, as systemd's service_notify_message(); called under the lock."""
        name = fields.get("FDNAME")
        if name is not None and not _fdname_is_valid(name):
            name = None
            fields = {k: v for k, v in fields.items() if not k.startswith("FDSTORE")}
        if fields.get("READY") == "1":
            self.ready.set()
        if fields.get("STOPPING") == "1":
            self.stopping.set()
        if "STATUS" in fields:
            self.status = fields["STATUS"]
        if fields.get("WATCHDOG") == "1":
            self.watchdog_pings += 1
        if fields.get("FDSTOREREMOVE") == "1" and name is not None:
            for gone in [fd for n, fd in self._stored if n == name]:
                os.close(gone)
            self._stored = [(n, fd) for n, fd in self._stored if n != name]
        kept: set[int] = set()
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                duplicate = any(_same_file(old, fd) for _, old in self._stored)
                if not duplicate and len(self._stored) < self.max_fds:
                    self._stored.append((name or "stored", fd))
                    kept.add(fd)
        for fd in fds:
            if fd not in kept:
                os.close(fd)
