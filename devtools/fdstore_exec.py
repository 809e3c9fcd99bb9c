"""Exec a program with descriptors numbered as systemd passes them (tests only).

Usage: python fdstore_exec.py FD,FD,... PROGRAM ARGS...

The listed descriptors (inherited at whatever numbers the parent had them) become 3, 4, ...
in order, and LISTEN_PID is set to this process's pid, which the program keeps across exec:
what systemd does between fork and exec (sd_listen_fds(3)). LISTEN_FDS and LISTEN_FDNAMES
come from the parent (devtools/fdstore.py). Run by path, without importing tensorferry,
so that the program starts as quickly as it would under systemd.
"""

from __future__ import annotations

import fcntl
import os
import sys

#: SD_LISTEN_FDS_START (daemon/systemd.py LISTEN_FDS_START; not imported, see above).
FIRST = 3


def place(sources: list[int]) -> None:
    """Move ``sources`` to FIRST, FIRST + 1, ...: each first to a number above every source
    and target, so no dup2 lands on a source not moved yet."""
    above = max([*sources, FIRST + len(sources)]) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in sources]
    for fd in sources:
        os.close(fd)
    for target, fd in enumerate(high, start=FIRST):
        os.dup2(fd, target, inheritable=True)
        os.close(fd)


def main(args: list[str]) -> None:
    sources = [int(fd) for fd in args[0].split(",") if fd]
    argv = args[1:]
    environ = dict(os.environ)
    if sources:
        place(sources)
        environ["LISTEN_PID"] = str(os.getpid())
    os.execvpe(argv[0], argv, environ)


if __name__ == "__main__":
    main(sys.argv[1:])
