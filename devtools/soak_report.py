"""What the soak saw, which errors it expects, and its verdict.

Expected errors (anything else fails the soak):

- ``daemon restart``: DaemonNotRunning or DaemonUnavailable (UNAVAILABLE) in an action that
  overlapped the window from the daemon's SIGKILL to a few seconds after its successor
  answered (gRPC's reconnect backoff), and held leases ending ``lost`` in it.
- ``evicted while loading``: ModelEvicted (ABORTED): another worker evicted the model the
  request was waiting for.
- ``retries exhausted``: StoreUnavailable "(gave up after N attempts; ...)": the injected
  faults used up a range's attempts or the load's retry budget. At the soak's fault rate
  this is rare; it is the daemon's documented answer to a store that keeps failing.

Evicting a model that is not resident (ModelNotFound) is an outcome, not an error.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

#: Seconds after the restarted daemon answers in which UNAVAILABLE still counts as the
#: restart's: gRPC channels back off (1 s, then 1.6 s, ...) before they reconnect.
RECONNECT_GRACE = 5.0
#: Seconds a load of the soak's models never takes, faults and retries included (each is
#: under 20 MiB; a range's 6 attempts take at most about 15 s): a model `loading` longer is
#: stuck, and so is a request waiting longer when the daemon is killed under it.
STUCK = 15.0
_GAP_TYPES = ("DaemonNotRunning", "DaemonUnavailable")


@dataclasses.dataclass
class Finding:
    category: str
    expected: bool
    worker: int
    action: str
    model: str
    message: str
    note: str = ""

    def line(self) -> str:
        note = f" [{self.note}]" if self.note else ""
        where = f"worker {self.worker} {self.action} {self.model}"
        return f"{self.category}: {where}: {self.message}{note}"


@dataclasses.dataclass
class Report:
    seconds: float = 0.0
    workers: int = 0
    seed: int = 0
    fault_rate: float = 0.0
    header_fault_rate: float = 0.0
    fault_targets: list[str] = dataclasses.field(default_factory=list)
    actions: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    loads_verified: int = 0
    attached: int = 0
    tensors_verified: int = 0
    bytes_verified: int = 0
    mismatches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    findings: list[Finding] = dataclasses.field(default_factory=list)
    self_kills: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    faults_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    requests: dict[str, int] = dataclasses.field(default_factory=dict)
    daemon_restarts: int = 0
    restart_gaps: list[list[float]] = dataclasses.field(default_factory=list)
    swept_segments: int = 0
    #: Of those, arenas the restarted daemon adopted (sealed, source unchanged) and served.
    adopted_models: int = 0
    retries: int = 0
    longest_action: float = 0.0
    longest_loading: float = 0.0
    longest_loading_model: str = ""
    rss_anon_mib: list[float] = dataclasses.field(default_factory=list)
    #: Leaks, stuck models, overruns, crashes: each one line.
    problems: list[str] = dataclasses.field(default_factory=list)
    workdir: str = ""

    def in_gap(self, t0: float, t1: float) -> bool:
        return self.gap_start(t0, t1) is not None

    def gap_start(self, t0: float, t1: float) -> float | None:
        """When the restart that [t0, t1] overlapped began (None: it overlapped none)."""
        for start, end in self.restart_gaps:
            if t0 <= end + RECONNECT_GRACE and t1 >= start:
                return start
        return None

    def classify(self, worker: int, event: dict[str, Any], t0: float) -> Finding:
        err = event["error"]
        kind, message = err["type"], err["message"]
        action, model = event["action"], event["model"]
        gap_start = self.gap_start(t0, event["t"])
        gap = gap_start is not None

        def finding(category: str, expected: bool, note: str = "") -> Finding:
            return Finding(category, expected, worker, action, model,
                           f"{kind} ({err['code']}): {message}", note)  # fmt: skip

        if kind == "DaemonUnavailable" and "was not resident within" in message:
            return finding("deadline", False, "a load waited past its deadline; a model stuck "
                           "`loading` (issue 25 defect 6)?")  # fmt: skip
        if kind in _GAP_TYPES and gap_start is not None:
            if action not in ("hold", "final_hold") and gap_start - t0 > STUCK:
                return finding("hang ended by the restart", False,
                               f"it had waited {gap_start - t0:.0f} s when the daemon was "
                               "killed; a model stuck `loading` (issue 25 defect 6)?")  # fmt: skip
            return finding("daemon restart", True)
        if kind == "ModelEvicted":
            return finding("evicted while loading", True)
        if kind == "StoreUnavailable" and "(gave up after" in message:
            return finding("retries exhausted", True)
        if kind == "StoreUnavailable":
            return finding("store fault not retried", False,
                           "one fault failed the load: a header or index read is not retried "
                           "(issue 25 defect 5)")  # fmt: skip
        if "is not visible to this process" in message:
            if gap:
                return finding("daemon restart", True, "the successor swept the arena")
            return finding("wrong error for an evicted stream", False,
                           "a streamed load evicted mid-fetch blames the deployment "
                           "(issue 25 defect 7)")  # fmt: skip
        if "Broken pipe" in message or "Stream removed" in message:
            return finding("broken stream", False, "issue 25 defect 8?")
        return finding("unexpected", False)

    def lease_check(self, worker: int, event: dict[str, Any], t0: float) -> None:
        """How leases ended: Release ends one as "released"; a held one stays held."""
        action, end = event["action"], event.get("lease_end", "unset")
        gap = self.in_gap(t0, event["t"])
        if action == "release_early":
            if event.get("released") is False and not gap:
                self.problems.append(f"worker {worker}: Release of its own lease answered False")
            if end != "released" and not gap:
                self.problems.append(
                    f"worker {worker}: after Release the lease ended as {end!r}, not 'released'"
                )
        elif action in ("load", "hold") and end not in ("unset", None) and not gap:
            self.problems.append(f"worker {worker}: a held lease ended as {end!r} while held")

    def add_end(self, worker: int, event: dict[str, Any], t0: float) -> None:
        error = event.get("error")
        self.longest_action = max(self.longest_action, event["t"] - t0)
        self.loads_verified += event.get("verified_loads", 0)
        self.attached += bool(event.get("attached"))
        self.tensors_verified += event.get("tensors", 0)
        self.bytes_verified += event.get("bytes", 0)
        for m in event.get("mismatches", []):
            self.mismatches.append({"worker": worker, "action": event["action"], **m})
        if error is None:
            self.actions[f"{event['action']} ok"] += 1
            self.lease_check(worker, event, t0)
            return
        f = self.classify(worker, event, t0)
        self.actions[f"{event['action']} {f.category}"] += 1
        self.findings.append(f)

    def expected(self) -> collections.Counter[str]:
        return collections.Counter(f.category for f in self.findings if f.expected)

    def unexpected(self) -> list[Finding]:
        return [f for f in self.findings if not f.expected]

    def failures(self) -> list[str]:
        out = [f"{len(self.mismatches)} byte mismatches"] if self.mismatches else []
        out += [f.line() for f in self.unexpected()]
        return out + self.problems

    @property
    def passed(self) -> bool:
        return not self.failures()

    def as_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs, as keys.
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["actions"], data["self_kills"] = dict(self.actions), dict(self.self_kills)
        rss = self.rss_anon_mib
        data["rss_anon_mib"] = [min(rss), max(rss)] if rss else []
        data["expected_errors"] = dict(self.expected())
        data["unexpected_errors"] = [dataclasses.asdict(f) for f in self.unexpected()]
        data["findings"] = [dataclasses.asdict(f) for f in self.findings if f.expected][:50]
        data["passed"] = self.passed
        return data

    def summary(self) -> str:
        mb = self.bytes_verified / 1e6
        kills = ", ".join(f"{n} {how}" for how, n in sorted(self.self_kills.items())) or "none"
        lines = [
            f"soak: {self.seconds:.0f} s, {self.workers} workers, seed {self.seed}; faulted: "
            f"{self.fault_rate:.0%} of data and {self.header_fault_rate:.0%} of header/index "
            f"GETs ({', '.join(self.fault_targets)})",
            f"  loads verified   {self.loads_verified} ({self.attached} attached), "
            f"{self.tensors_verified} tensors, {mb:.0f} MB compared with the source",
            f"  mismatches       {len(self.mismatches)}",
            f"  actions          {dict(sorted(self.actions.items()))}",
            f"  expected errors  {dict(self.expected()) or 'none'}",
            f"  unexpected       {len(self.unexpected())}",
            f"  faults injected  {sum(self.faults.values())} {self.faults_by_kind}: {self.faults}",
            f"  requests         {self.requests}; daemon retries (recent loads) {self.retries}",
            f"  self-kills       {kills}",
            f"  daemon restarts  {self.daemon_restarts} (gaps {self._gaps()}), "
            f"{self.swept_segments} dead segments swept or adopted "
            f"({self.adopted_models} adopted)",
            f"  longest action   {self.longest_action:.1f} s; longest `loading` "
            f"{self.longest_loading:.1f} s {self.longest_loading_model}; daemon RssAnon MiB "
            f"{self._rss()}",
        ]
        failures = self.failures()
        for m in self.mismatches[:10]:
            lines.append(f"  MISMATCH {m}")
        for line in failures[:40]:
            lines.append(f"  FAIL {line}")
        if len(failures) > 40:
            lines.append(f"  ... and {len(failures) - 40} more")
        verdict = "PASS" if self.passed else f"FAIL ({len(failures)} problems)"
        lines.append(f"soak verdict: {verdict}" + (f"; logs in {self.workdir}" if failures else ""))
        return "\n".join(lines)

    def _gaps(self) -> str:
        return ", ".join(f"{end - start:.1f} s" for start, end in self.restart_gaps) or "none"

    def _rss(self) -> str:
        if not self.rss_anon_mib:
            return "n/a"
        return f"{min(self.rss_anon_mib):.0f}-{max(self.rss_anon_mib):.0f}"

    def dumps(self) -> str:
        return json.dumps(self.as_json(), indent=2, sort_keys=True)
