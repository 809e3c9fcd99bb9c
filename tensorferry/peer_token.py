"""Who holds a lease: the peer token a worker process sends with Load and Release.

gRPC shows every caller on a Unix socket as "unix:" (no SO_PEERCRED, no per-connection
id), so a lease could not be tied to the process holding it. Beside its gRPC socket the
daemon listens on ``<socket>.peer``: it reads each connection's kernel-verified
credentials (SO_PEERCRED) and answers a random token that stands for that process. The
client fetches one token per process and sends it as metadata; the daemon binds each
lease to the token it came with.
"""

from __future__ import annotations

import os
import socket
import threading

#: Request metadata: the caller's peer token.
PEER_KEY = "tensorferry-peer"
#: Trailing metadata of a lease's Load stream: why the daemon ended it.
LEASE_END_KEY = "tensorferry-lease-end"
TOKEN_BYTES = 64

_lock = threading.Lock()
# peer socket path -> (this process, that socket file's identity), token
_tokens: dict[str, tuple[tuple[int, int, int], str]] = {}


def peer_socket(grpc_socket: str | os.PathLike[str]) -> str:
    return os.fspath(grpc_socket) + ".peer"


def peer_token(grpc_socket: str, timeout: float = 10.0) -> str | None:
    """This process's token from the daemon at ``grpc_socket`` (None: it has no peer socket).

    Cached per process (a forked child asks for its own: its parent's leases are not its
    own) and per socket file (a restarted daemon knows none of its predecessor's tokens).
    """
    path = peer_socket(grpc_socket)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (os.getpid(), st.st_ino, st.st_ctime_ns)
    with _lock:
        hit = _tokens.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        data = b""
        while not data.endswith(b"\n") and len(data) <= TOKEN_BYTES:
            part = conn.recv(TOKEN_BYTES + 1)
            if not part:
                break
            data += part
    token = data.decode("ascii", errors="replace").strip()
    if not token:
        return None
    with _lock:
        _tokens[path] = (key, token)
    return token
