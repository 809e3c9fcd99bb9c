"""The daemon's side of peer tokens (see ``tensorferry.peer_token``): the ``<socket>.peer``
listener, and who a call comes from.

A token stands for one process: the pid, uid and gid the kernel reported for the
connection that fetched it, and that process's start time, so a process that later gets
the same pid does not inherit it. A worker in another pid namespace shows as pid 0; its
token still stands for the one process that fetched it, but the daemon cannot tell when
that process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tensorferry.daemon.config.settings import ConfigError
from tensorferry.errors import InvalidRequest
from tensorferry.peer_token import PEER_KEY, peer_socket

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")
#: Tokens kept at most; beyond this, those of exited processes go, then the oldest.
MAX_TOKENS = 65536


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who a call comes from: ``key`` decides, ``label`` is for messages."""

    key: str
    label: str


@dataclasses.dataclass(frozen=True)
class _Process:
    pid: int
    uid: int
    start: int | None

    def alive(self) -> bool:
        return self.pid == 0 or _start_time(self.pid) == self.start


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


class Peers:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens: OrderedDict[str, _Process] = OrderedDict()

    def issue(self, pid: int, uid: int) -> str:
        token = secrets.token_hex(16)
        self._tokens[token] = _Process(pid, uid, _start_time(pid) if pid else None)
        if len(self._tokens) > MAX_TOKENS:
            for old in [t for t, p in self._tokens.items() if not p.alive()]:
                del self._tokens[old]
            while len(self._tokens) > MAX_TOKENS:
                self._tokens.popitem(last=False)
        return token

    def caller(self, context: Any) -> Peer | None:
        """Who a call comes from; None when it does not say (a client without a token)."""
        address = str(context.peer())
        if not address.startswith("unix:"):
            # Over TCP the connection itself is the identity: ip:port is one connection.
            return Peer(f"tcp {address}", address)
        metadata = context.invocation_metadata() or ()
        token = next((str(v) for k, v in metadata if k == PEER_KEY), None)
        if token is None:
            return None
        process = self._tokens.get(token)
        if process is None or not process.alive():
            self._tokens.pop(token, None)
            raise InvalidRequest(
                f"this call's {PEER_KEY} token is unknown to this daemon (it was issued "
                f"before a restart, or to a process that has exited); fetch one from {self.path}"
            )
        who = f"pid {process.pid}" if process.pid else "a process in another pid namespace"
        return Peer(token, f"{who} (uid {process.uid})")

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            writer.write(self.issue(pid, uid).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass  # the peer left before its answer: nothing to hand out
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serve_peers(grpc_socket: Path, mode: int, gid: int) -> AsyncIterator[Peers]:
    """Listen on ``<socket>.peer`` (mode and group as the socket) while the daemon runs."""
    path = Path(peer_socket(grpc_socket))
    if len(str(path).encode()) > 107:
        raise ConfigError(
            f"socket: {path}, the peer socket beside it, is longer than a Unix socket path "
            "may be (107 bytes); use a shorter socket path"
        )
    peers = Peers(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a daemon that was killed (we hold the socket's lock)
    server = await asyncio.start_unix_server(peers.answer, path=str(path))
    try:
        os.chmod(path, mode)
        os.chown(path, -1, gid)
        yield peers
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        await server.wait_closed()
