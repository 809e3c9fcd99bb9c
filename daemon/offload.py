"""Parsing of big untrusted inputs (safetensors headers, indexes) in a child process.

A thread is not enough. Parsing a 20 MB header (200k tensors) builds a JSON document of
about a million objects, and the garbage collector's passes over it hold the GIL for
40-130 ms at a time; with another process busy on the second core, Status answered after
1.9 s during such a load. A child parses and validates, and sends back the header, whose
tensors are columns of strings and ints (``format.safetensors.Entries``): they unpickle in
about 10 ms. With the plan made in steps (``planner.plan_load``), Status p99 through a
200k-tensor load, the other core busy, went from 170-290 ms to 35-55 ms
(bench/bench_loop_lag.py).

A child costs a process start (about 0.1 s), so only inputs of ``OFFLOAD_BYTES`` or more
take this way; smaller ones parse in a thread in less time than that. The child runs one
job and exits; a cancelled load kills it (within ``_POLL``). ``-P`` keeps the daemon's
working directory off its module path.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from tensorferry.daemon.threads import run_to_end
from tensorferry.errors import InternalError, InvalidArtifact, ResourceExhausted, TensorferryError
from tensorferry.format.index import index_shards
from tensorferry.format.safetensors import parse_header

log = logging.getLogger(__name__)
#: Inputs from this size parse in a child (about 20k tensors of a header).
OFFLOAD_BYTES = 2 << 20
#: How often the thread waiting for a child looks whether its load was cancelled.
_POLL = 0.05
JOBS: dict[str, Callable[..., Any]] = {"header": parse_header, "index": index_shards}
#: The errors a job may raise, re-raised in the daemon as they are.
_ERRORS: dict[str, type[TensorferryError]] = {
    cls.__name__: cls for cls in (InvalidArtifact, ResourceExhausted)
}


async def in_child(job: str, *args: Any, what: str) -> Any:
    """``JOBS[job](*args)``, run in a child process; ``what`` names the input in errors."""
    # Waited for even when cancelled: the child is killed, and the thread returns, first.
    status, out, err = await run_to_end(_run_child, job, args)
    if status != 0 or not out:
        lines = err.decode(errors="replace").strip().splitlines() or ["no output"]
        log.error("parsing %s in a child process failed (exit status %s):\n%s", what, status,
                  "\n".join(lines))  # fmt: skip
        raise InternalError(
            f"{what}: the process parsing it failed (exit status {status}: "
            f"{lines[-1][:200]}); see the daemon's log"
        )
    outcome, value = pickle.loads(out)  # our own child's answer, not the input's bytes
    if outcome == "error":
        name, message = value
        raise _ERRORS[name](message)
    return value


def _run_child(stop: threading.Event, job: str, args: tuple[Any, ...]) -> tuple[int, bytes, bytes]:
    """Start the child, hand it the job, and collect its answer (in a worker thread).

    ``subprocess`` starts it with vfork: a fork() of the daemon, as uvloop's subprocesses
    make, runs gRPC's fork handlers in the child, which then died with SIGSEGV now and
    then before it could exec. The job goes in as a file, not a pipe: nothing is left to
    write when a child dies early.
    """
    job_fd = os.memfd_create("tensorferry-parse", os.MFD_CLOEXEC)
    try:
        with open(job_fd, "wb", closefd=False) as f:
            pickle.dump((job, args), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.lseek(job_fd, 0, os.SEEK_SET)
        proc = subprocess.Popen(
            [sys.executable, "-P", "-X", "faulthandler", "-m", "tensorferry.daemon.offload"],
            stdin=job_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(job_fd)
    with proc:
        while True:
            try:
                out, err = proc.communicate(timeout=_POLL)
            except subprocess.TimeoutExpired:
                if stop.is_set():  # cancelled: the parse is no one's any more
                    proc.kill()
                    proc.communicate()
                    return -1, b"", b""
                continue
            return proc.returncode, out, err


def main() -> None:
    # The document's objects form no cycles: refcounting frees them, and the collector's
    # passes over the growing document would double the parse time.
    gc.disable()
    job, args = pickle.load(sys.stdin.buffer)
    try:
        answer: tuple[str, Any] = ("ok", JOBS[job](*args))
    except (InvalidArtifact, ResourceExhausted) as exc:
        answer = ("error", (type(exc).__name__, exc.message))
    pickle.dump(answer, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    main()
