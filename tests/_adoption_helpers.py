"""Parts of the adoption tests: a counting proxy with the daemons started behind it, worker
processes that hold views and answer on stdin, digests of models and the files of an instance."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from safetensors.torch import load_file

from tensorferry.devtools.daemon import wait_serving
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server
from tensorferry.v1 import tensorferry_pb2 as pb
from tests.adoption_worker import digest
from tests.conftest import SHM, Daemon, daemon_env, start_daemon

WORKER = str(Path(__file__).with_name("adoption_worker.py"))
# Room for a loaded 2-core machine (a worker imports torch in a few seconds there).
TIMEOUT = 60.0


def source_digest(directory: Path) -> str:
    """What `adoption_worker.digest` gives for the model written in ``directory``."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return digest(tensors)


def tensor_bytes(directory: Path) -> int:
    total = 0
    for path in directory.glob("*.safetensors"):
        total += sum(t.nbytes for t in load_file(str(path)).values())
    return total


def instance_files(instance: str) -> list[str]:
    """Every file of ``instance`` in /dev/shm: segments, manifests, lock, freed arenas."""
    return sorted(p.name for p in SHM.glob(f"tensorferry.{instance}.*"))


def segments(instance: str) -> list[str]:
    """The arena segments of ``instance`` (no lock, manifest or freed arena)."""
    names = instance_files(instance)
    return [n for n in names if not n.endswith((".lock", ".sealed")) and ".free-" not in n]


def inodes(instance: str) -> set[tuple[int, int]]:
    stats = (os.stat(SHM / name) for name in segments(instance))
    return {(s.st_dev, s.st_ino) for s in stats}


def segment_sizes(names: list[str]) -> list[int]:
    return sorted(os.stat(SHM / name).st_size for name in names)


class Worker:
    """``adoption_worker.py`` in a process of its own; its stdout read by a thread so that
    every wait has a deadline."""

    def __init__(self, socket: Path, uris: list[str], stderr: Path) -> None:
        self._stderr_path = stderr
        self._stderr: IO[bytes] = open(stderr, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, str(socket), *uris],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.loaded = [json.loads(self.line()) for _ in uris]
        assert self.line() == "held"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def line(self, timeout: float = TIMEOUT) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker silent for {timeout} s: {self.stderr()}") from None
        if line is None:
            raise AssertionError(f"worker exited ({self.proc.wait()}): {self.stderr()}")
        return line

    def ask(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def digests(self) -> dict[str, dict[str, Any]]:
        """Per URI held: sha256 recomputed from its views now, lease_end, lease_restores."""
        self.ask("digest")
        out: dict[str, dict[str, Any]] = {}
        while (line := self.line()) != "done":
            report = json.loads(line)
            out[report["uri"]] = report
        return out

    def attach(self, uri: str, runs: int) -> dict[str, Any]:
        self.ask(f"attach {uri} {runs}")
        result: dict[str, Any] = json.loads(self.line())
        return result

    def stderr(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text(errors="replace")

    def close(self) -> tuple[int, str]:
        """End stdin (the worker exits); its status and stderr."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(TIMEOUT)
        self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode, self._stderr_path.read_text(errors="replace")


@dataclasses.dataclass
class Fleet:
    """Daemons behind one CountingProxy, and workers, all ended at the test's end."""

    s3: S3Server
    proxy: CountingProxy
    daemons: list[Daemon] = dataclasses.field(default_factory=list)
    workers: list[Worker] = dataclasses.field(default_factory=list)
    tmp: Path = dataclasses.field(default_factory=lambda: Path(tempfile.mkdtemp(dir="/tmp")))

    @property
    def env(self) -> dict[str, str]:
        return daemon_env(self.s3, self.proxy.endpoint)

    def start(
        self, allow: list[str], *, socket: Path | None = None, extra_config: str = "",
        s3_config: str = "", env: dict[str, str] | None = None,
    ) -> tuple[Daemon, pb.StatusResponse]:  # fmt: skip
        """A daemon and its FIRST Status answer (nobody asked it anything before)."""
        d = start_daemon(
            env or self.env, allow=allow, socket=socket, extra_config=extra_config,
            s3_config=s3_config, wait=False,
        )  # fmt: skip
        self.daemons.append(d)
        first = wait_serving(d.proc, d.socket, log=d.log)
        d.instance = first.instance_id
        return d, first

    def worker(self, socket: Path, *uris: str) -> Worker:
        w = Worker(socket, list(uris), self.tmp / f"worker-{len(self.workers)}.err")
        self.workers.append(w)
        return w

    def data_bytes(self) -> int:
        return self.proxy.stats().body_bytes[Kind.DATA_GET]

    def close(self) -> None:
        for w in self.workers:
            w.close()
        for d in self.daemons:
            if d.proc.poll() is None:
                d.stop()
            # Arenas a stop left for adoption: no daemon comes to adopt them.
            for name in instance_files(d.instance) if d.instance else []:
                with contextlib.suppress(FileNotFoundError):
                    (SHM / name).unlink()
            shutil.rmtree(d.log.parent, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
