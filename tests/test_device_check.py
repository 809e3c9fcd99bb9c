"""The device check's dry run (scripts/device-check --dry-run): every step of the GPU
host's check on the fake CUDA API, so the script cannot go stale unnoticed."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_dry_run_passes_every_check(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    run = subprocess.run(
        [str(ROOT / "scripts" / "device-check"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checks"] == {
        "idle_holds_nothing": True, "cold_load_byte_equal": True, "zero_copy": True,
        "attach_byte_equal": True, "two_workers_one_arena": True,
        "workers_closed_their_mappings": True, "evicted_to_idle": True,
    }  # fmt: skip
    # The daemon served a CPU load and held nothing on either GPU; then only cuda:0 opened.
    assert result["idle"]["contexts"] == [False, False]
    assert result["loaded"]["contexts"] == [True, False]
    assert result["cold_load"]["attached"] is False
    assert result["h2d"]["h2d_gbps"] > 0
    assert result["h2d"]["host_register_s_per_gb"] >= 0
    assert result["vmm_descriptor_across_pid_namespace"].startswith("not implemented")


def _proc(code: str, err: Path) -> subprocess.Popen[str]:
    with err.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=stderr, text=True,
        )  # fmt: skip


def test_a_worker_that_crashes_leaves_its_traceback_in_the_json(tmp_path: Path) -> None:
    from tensorferry.devtools.device_check import _answer
    from tensorferry.devtools.device_check_steps import read_line

    err = tmp_path / "w.err"
    with _proc("raise SystemExit('cuda:0 is exclusive to another process')", err) as proc:
        answer = _answer(proc, read_line(proc, 60), err)
    assert answer == {
        "error": "no answer", "exit_status": 1,
        "stderr_tail": "cuda:0 is exclusive to another process\n",
    }  # fmt: skip


def test_a_worker_that_does_not_exit_is_killed_and_recorded(tmp_path: Path) -> None:
    from tensorferry.devtools.device_check import _end

    err = tmp_path / "w.err"
    code = "import sys, time; sys.stdin.read(); print('{\"closed\": 0}', flush=True); time.sleep(9)"
    with _proc(code, err) as proc:
        answer = _end(proc, err, wait=0.2)
    assert answer == {
        "closed": 0, "error": "did not exit within 0.2 s of its answer: killed",
        "stderr_tail": "",
    }  # fmt: skip
    assert proc.returncode == -signal.SIGKILL


def test_gpu_bytes_are_unknown_when_nvidia_smi_never_lists_the_daemons_pid() -> None:
    from tensorferry.devtools.device_check_steps import pid_unseen

    def state(arenas: int, smi: int) -> dict[str, Any]:
        return {"arena_bytes": arenas, "gpu_bytes": smi, "gpu_bytes_from": "nvidia-smi"}

    # A pod without hostPID: the daemon holds arenas, nvidia-smi lists no such PID.
    out = {"idle": state(0, 0), "loaded": state(1 << 30, 0), "after_evict": state(0, 0)}
    pid_unseen(out)
    assert {k: (v["gpu_bytes"], v["gpu_bytes_from"]) for k, v in out.items()} == dict.fromkeys(
        ("idle", "loaded", "after_evict"),
        (None, "unknown: nvidia-smi never lists the daemon's PID, even with arenas loaded "
               "(another PID namespace: a pod without hostPID)"),
    )  # fmt: skip
    seen = {"idle": state(0, 0), "loaded": state(1 << 30, 1 << 30), "after_evict": state(0, 0)}
    pid_unseen(seen)
    assert seen["idle"]["gpu_bytes"] == 0  # listed when loaded: its idle 0 is real


def test_doctor_warns_when_the_daemon_does_not_say_what_it_holds(tmp_path: Path) -> None:
    from tensorferry.daemon.config.settings import Settings
    from tensorferry.daemon.gpu.doctor_gpu import check_daemon_gpus

    path = tmp_path / "d.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on
    stale.close()
    lines: list[tuple[str, str, str]] = []
    check_daemon_gpus(
        dataclasses.replace(Settings(), socket=path), lambda *line: lines.append(line)
    )
    ((level, what, fix),) = lines
    assert level == "warn"
    assert what.startswith(
        f"daemon at {path}: what it holds on the GPUs is unknown (DaemonNotRunning: "
    )
    assert fix == "check that `tensorferry status` answers (a stale socket, or no access to it)"
