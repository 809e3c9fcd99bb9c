"""One soak worker: random actions against the daemon until a deadline, every byte it is
handed checked against the source's digests.

Usage: python -m tensorferry.devtools.soak_worker SOCKET PLAN SEED UNTIL DEADLINE
(UNTIL: a time.monotonic() value, shared by every process on the host; DEADLINE: seconds
a load may wait). ``--first=ACTION`` starts with that action; ``--final-hold`` instead
loads one model and holds it until the daemon ends the lease (the shutdown check).

Each action prints a JSON line when it starts and one when it ends (``ok`` with figures,
or the error's type, status code and message); a worker about to kill itself says so
first. The soak reads these from stdout; tracebacks go to stderr.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fnmatch
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from typing import Any

from tensorferry.client import Client
from tensorferry.devtools.soak_verify import Verifier
from tensorferry.errors import ModelNotFound, TensorferryError

#: Relative weights of the actions; the self-kills are few, as each costs a new process.
WEIGHTS = {
    "load": 26, "stream": 18, "stream_abandon": 7, "release_early": 7, "hold": 10,
    "select": 8, "evict": 10, "evict_loading": 5, "evict_race": 5, "list": 3,
    "die_loading": 2, "die_streaming": 1, "die_holding": 1,
}  # fmt: skip


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


class Worker(Verifier):
    def __init__(self, socket: str, plan: dict[str, Any], seed: int, deadline: float) -> None:
        super().__init__(plan)
        self.socket, self.deadline = socket, deadline
        self.rng = random.Random(seed)
        self.name = f"soak worker {os.getpid()}"

    # -- actions -----------------------------------------------------------------------
    def client(self) -> Client:
        # A client per action, as most workers have: one per process and load.
        return Client(self.socket)

    def load(self, model: str, hold: float = 0.0) -> None:
        with self.client() as c:
            loaded = c.load(self.plan[model]["uri"], timeout=self.deadline, client_name=self.name)
        self.figures["attached"] = loaded.attached
        self.check_model(model, loaded, "ready")
        if hold or self.rng.random() < 0.3:
            # Others evict and load meanwhile; a held arena must not change under us.
            end = time.monotonic() + (hold or self.rng.uniform(0.1, 1.0))
            while time.monotonic() < end:
                time.sleep(min(0.7, max(end - time.monotonic(), 0)))
                self.check_model(model, loaded, "held")
            self.figures["lease_end"] = loaded.lease_end
        loaded.close()

    def hold(self, model: str) -> None:
        self.load(model, hold=self.rng.uniform(1.0, 4.0))

    def stream(self, model: str, stop_after: int | None = None) -> None:
        with self.client() as c:
            stream = c.stream(self.plan[model]["uri"], timeout=self.deadline, client_name=self.name)
            seen: set[str] = set()
            pairs = iter(stream)
            try:
                for i, (name, tensor) in enumerate(pairs):
                    if stop_after is not None and i >= stop_after:
                        self.figures["abandoned_after"] = i
                        return  # leaving early ends the request: the lease is never ours
                    seen |= self.check(model, [(name, tensor)], "landed")
                    del tensor
            finally:
                pairs.close()  # type: ignore[attr-defined]
            loaded = stream.model
        self.figures["attached"] = loaded.attached
        self.check_names(model, seen, set(self.plan[model]["tensors"]), "landed")
        self.check_model(model, loaded, "ready")
        loaded.close()

    def stream_abandon(self, model: str) -> None:
        self.stream(model, stop_after=self.rng.randrange(0, 8))

    def release_early(self, model: str) -> None:
        with self.client() as c:
            loaded = c.load(self.plan[model]["uri"], timeout=self.deadline, client_name=self.name)
            names = list(loaded.tensors)[:3]
            self.check(model, ((n, loaded.tensors[n]) for n in names), "ready")
            self.figures["released"] = c.release(loaded.lease_id)
        # After Release the arena may be freed and refilled: the views are not read again.
        # They are dropped only once the daemon has ended the stream, or the client's own
        # cancel would race its "released".
        end = time.monotonic() + 10
        while loaded.lease_end is None and time.monotonic() < end:
            time.sleep(0.02)
        self.figures["lease_end"] = loaded.lease_end
        loaded.close()

    def select(self, model: str) -> None:
        names = sorted(self.plan[model]["tensors"])
        pick = self.rng.choice(names)
        patterns = [pick.rsplit(".", 1)[0] + ".*"] if "." in pick else [pick]
        want = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        with self.client() as c:
            loaded = c.load(
                self.plan[model]["uri"], timeout=self.deadline, client_name=self.name,
                select=patterns,
            )  # fmt: skip
        seen = self.check(model, loaded.tensors.items(), "ready")
        self.check_names(model, seen, want, "ready")
        for name in sorted(seen - want):
            self.mismatch(model, name, "ready", "not selected")
        self.figures["verified_loads"] = 1
        loaded.close()

    def evict(self, model: str) -> None:
        with self.client() as c:
            try:
                done = c.evict(self.plan[model]["uri"], client_name=self.name)
            except ModelNotFound:
                self.figures["evicted"] = 0
                return
        self.figures["evicted"] = len(done.evicted)

    def evict_loading(self, model: str) -> None:
        """Evict whichever model is `loading` first seen in a short watch: the races between
        Evict and a load starting, fetching or streaming."""
        end = time.monotonic() + 1.5
        with self.client() as c:
            while time.monotonic() < end:
                loading = [m.model_id for m in c.list() if m.state == "loading"]
                if loading:
                    with contextlib.suppress(ModelNotFound):  # it became ready and was evicted
                        self.figures["evicted"] = len(c.evict(loading[0], self.name).evicted)
                    return
                time.sleep(0.01)

    def evict_race(self, model: str) -> None:
        """Evict the model again and again while this worker's own load (or stream) of it
        starts: Evict landing as the load is registered, planned, mapped or streamed."""
        uri, outcome = self.plan[model]["uri"], list[BaseException]()
        fetch = self.stream if self.rng.random() < 0.5 else self.load

        def load() -> None:
            try:
                fetch(model)
            except BaseException as exc:  # re-raised on the action's thread below
                outcome.append(exc)

        thread = threading.Thread(target=load)
        with self.client() as c:
            thread.start()
            for _ in range(self.rng.randrange(1, 40)):
                with contextlib.suppress(ModelNotFound):
                    c.evict(uri, self.name)
                time.sleep(0.003)
        thread.join()
        if outcome:
            raise outcome[0]

    def list(self, model: str) -> None:
        with self.client() as c:
            states = [m.state for m in c.list()]
        self.figures["states"] = states

    def die(self, how: str) -> None:
        emit(ev="dying", how=how, t=time.monotonic())
        os.kill(os.getpid(), signal.SIGKILL)

    def die_loading(self, model: str) -> None:
        at = self.rng.uniform(0.05, 0.9)

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "fetch" and total and done >= at * total:
                self.die("mid-load")

        with self.client() as c:
            with contextlib.suppress(ModelNotFound):  # a resident model would only attach
                c.evict(self.plan[model]["uri"], self.name)
            c.load(self.plan[model]["uri"], timeout=self.deadline, progress=progress)
        self.die("after an attach")  # another worker loaded it again meanwhile

    def die_streaming(self, model: str) -> None:
        with self.client() as c:
            for i, _ in enumerate(c.stream(self.plan[model]["uri"], timeout=self.deadline)):
                if i >= 2:
                    self.die("mid-stream")
        self.die("after a stream")

    def die_holding(self, model: str) -> None:
        with self.client() as c:
            loaded = c.load(self.plan[model]["uri"], timeout=self.deadline)
        self.check_model(model, loaded, "ready")
        self.die("holding a lease")

    # -- the loop ----------------------------------------------------------------------
    def run(self, until: float, first: str = "") -> None:
        actions, weights = list(WEIGHTS), list(WEIGHTS.values())
        while time.monotonic() < until:
            action, first = first or self.rng.choices(actions, weights)[0], ""
            model = self.rng.choice(sorted(self.plan))
            self.figures = {}
            emit(ev="start", action=action, model=model, t=time.monotonic())
            error: dict[str, Any] | None = None
            try:
                getattr(self, action)(model)
            except TensorferryError as exc:
                error = {"type": type(exc).__name__, "code": exc.code.name, "message": exc.message}
            except Exception as exc:
                traceback.print_exc()
                error = {"type": type(exc).__name__, "code": "", "message": str(exc)[:500]}
            emit(ev="end", action=action, model=model, t=time.monotonic(), error=error,
                 **self.figures)  # fmt: skip
            if error is not None and error["code"] == "UNAVAILABLE":
                time.sleep(self.rng.uniform(0.2, 0.5))  # as a real worker backs off

    def final_hold(self, model: str) -> None:
        """Load ``model``, say so, then wait (bounded) for the daemon to end the lease."""
        self.figures = {}
        emit(ev="start", action="final_hold", model=model, t=time.monotonic())
        error: dict[str, Any] | None = None
        try:
            with self.client() as c:
                loaded = c.load(self.plan[model]["uri"], timeout=self.deadline)
            emit(ev="holding", t=time.monotonic())
            # The daemon ends leases SHUTDOWN_GRACE after SIGTERM; the soak SIGKILLs it if it
            # has not stopped within a minute (the lease then ends "lost").
            end = time.monotonic() + 90
            while loaded.lease_end is None and time.monotonic() < end:
                time.sleep(0.05)
            # The daemon is gone, its segment unlinked: the mapping must still be intact.
            self.check_model(model, loaded, "after shutdown")
            self.figures["lease_end"] = loaded.lease_end
        except TensorferryError as exc:
            error = {"type": type(exc).__name__, "code": exc.code.name, "message": exc.message}
        emit(ev="end", action="final_hold", model=model, t=time.monotonic(), error=error,
             **self.figures)  # fmt: skip


def main(argv: list[str]) -> int:
    # The soak asks for every thread's stack with SIGUSR1 before killing a worker that
    # overran its deadline.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    final = "--final-hold" in argv
    first = next((a.partition("=")[2] for a in argv if a.startswith("--first=")), "")
    socket, plan_path, seed, until, deadline = [a for a in argv if not a.startswith("--")]
    with open(plan_path) as f:
        plan = json.load(f)
    worker = Worker(socket, plan, int(seed), float(deadline))
    if final:
        worker.final_hold(sorted(plan)[int(seed) % len(plan)])
    else:
        worker.run(float(until), first)
    emit(ev="exit", t=time.monotonic())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
