"""The soak's workers: one subprocess per place, its events read on a thread, respawned
when it kills itself, killed (after a stack dump) when an action runs past its deadline."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from tensorferry.devtools.soak_daemon import SoakDaemon, clean_env, python_module
from tensorferry.devtools.soak_report import Report

WORKER = "tensorferry.devtools.soak_worker"
#: Past its deadline plus this, a worker's action is an overrun: its stacks are dumped.
OVERRUN_SLACK = 20.0


@dataclasses.dataclass(frozen=True)
class Options:
    seconds: float = 60.0
    workers: int = 4
    seed: int = 0
    #: Seconds a load may wait for its model (the client's timeout).
    deadline: float = 60.0
    fault_rate: float = 0.04
    header_fault_rate: float = 0.15
    fault_targets: tuple[str, ...] = ("data", "header", "object")
    restart: bool = True
    keep: bool = False
    #: The daemon's own `[fetch] workers` (None: its default): GETs in fetch processes.
    fetch_workers: int | None = None


@dataclasses.dataclass
class Slot:
    """One worker place: its current process, what it is doing, how it said it would end."""

    index: int
    proc: subprocess.Popen[str]
    reader: threading.Thread
    stderr: Path
    current: dict[str, Any] | None = None
    dying: str = ""
    overrun: bool = False


class Pool:
    def __init__(self, opts: Options, daemon: SoakDaemon, plan: Path, until: float) -> None:
        self.opts, self.daemon, self.plan, self.until = opts, daemon, plan, until
        self.spawned = 0
        #: (worker, start event, end event), classified once the restart gaps are known.
        self.ends: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def spawn(self, *extra: str) -> Slot:
        self.spawned += 1
        seed = str(self.opts.seed * 10_000 + self.spawned)
        stderr = self.daemon.workdir / f"worker-{self.spawned}.err"
        with open(stderr, "w") as err:
            proc = subprocess.Popen(
                python_module(WORKER, str(self.daemon.socket), str(self.plan), seed,
                              str(self.until), str(self.opts.deadline), *extra),
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                env=clean_env(), cwd=self.daemon.workdir,
            )  # fmt: skip
        slot = Slot(self.spawned, proc, threading.Thread(), stderr)
        slot.reader = threading.Thread(target=self._read, args=(slot,), daemon=True)
        slot.reader.start()
        return slot

    def _read(self, slot: Slot) -> None:
        stdout: IO[str] | None = slot.proc.stdout
        assert stdout is not None
        for line in stdout:
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                with self.lock:
                    self.events.append((slot.index, event))
                    if event["ev"] == "start":
                        slot.current = event
                    elif event["ev"] == "end" and slot.current is not None:
                        self.ends.append((slot.index, slot.current, event))
                        slot.current = None
                    elif event["ev"] == "dying":
                        slot.dying = event["how"]

    def reap(self, slot: Slot, report: Report) -> None:
        """A worker ended: fine when it finished or killed itself as announced."""
        rc = slot.proc.wait()
        slot.reader.join(10)
        if slot.proc.stdout is not None:
            slot.proc.stdout.close()
        if rc == 0 or slot.overrun or (rc == -9 and slot.dying):
            if slot.dying:
                report.self_kills[slot.dying] += 1
            return
        tail = slot.stderr.read_text(errors="replace")[-1500:]
        report.problems.append(f"worker {slot.index} exited with status {rc}: {tail}")

    def watch(self, slot: Slot, report: Report, now: float) -> None:
        """An action past its deadline: dump the worker's stacks, then kill it."""
        with self.lock:
            current = slot.current
        if (
            current is None
            or slot.overrun
            or now - current["t"] < self.opts.deadline + OVERRUN_SLACK
        ):
            return
        slot.overrun = True
        slot.proc.send_signal(signal.SIGUSR1)  # faulthandler prints every thread's stack
        time.sleep(1.0)
        slot.proc.kill()
        slot.proc.wait()
        stacks = slot.stderr.read_text(errors="replace")[-3000:]
        report.problems.append(
            f"worker {slot.index} waited past its deadline in {current['action']} "
            f"{current['model']} ({now - current['t']:.0f} s); its stacks:\n{stacks}"
        )
