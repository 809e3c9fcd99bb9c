"""Running it under systemd: sd_notify, watchdog, preload at start, draining on SIGTERM."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tensorferry.client import DaemonUnavailable
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import (
    BUCKET,
    daemon_env,
    running_daemon,
    serve_refused,
    short_dir,
    start_daemon,
    upload,
)


def test_notify_ready_watchdog_and_stopping(s3: S3Server) -> None:
    path = short_dir() / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20)
    env = daemon_env(s3)
    env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000")
    try:
        d = start_daemon(env, allow=[f"s3://{BUCKET}/"])
        messages = [listener.recv(4096).decode() for _ in range(3)]
        assert messages[0].startswith("READY=1\nSTATUS=serving on ")
        assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]  # every WatchdogSec / 2
        d.stop(signal.SIGTERM)
        rest = []
        while "STOPPING=1" not in rest:
            rest.append(listener.recv(4096).decode())
    finally:
        listener.close()


def test_preload_list_loads_at_start(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    uri = upload(s3, tmp_path / "m", prefix)
    prelude = f'preload = ["{uri}", "s3://{BUCKET}/{prefix}missing/"]\n'
    with running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], prelude=prelude) as d:
        deadline = time.monotonic() + 20
        with d.client() as client:
            while time.monotonic() < deadline and [m.state for m in client.list()] != ["ready"]:
                time.sleep(0.05)
            assert [(m.uri, m.state) for m in client.list()] == [(uri, "ready")]
            assert client.status().recent_loads[0].uri in (uri, f"s3://{BUCKET}/{prefix}missing/")
    assert f"preload of s3://{BUCKET}/{prefix}missing/ failed: " in d.output()


def test_sigterm_drains_leases_within_the_grace_period(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    uri = upload(s3, tmp_path / "m", prefix)
    # With [memory] adopt (the default) a sealed model's lease comes back after the restart,
    # so SIGTERM does not wait for it; without, the lease is drained.
    d = start_daemon(
        daemon_env(s3), allow=[f"s3://{BUCKET}/"], prelude="shutdown_grace = 20\n",
        extra_config="[memory]\nadopt = false\n",
    )  # fmt: skip
    with d.client() as client:
        model = client.load(uri)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert d.proc.poll() is None  # waiting for our lease
        with pytest.raises(DaemonUnavailable) as info:
            client.load(uri, select=["layers.0.bias"])
        assert info.value.message == (
            "the tensorferry daemon is shutting down and takes no new loads; retry when it is back"
        )
        t0 = time.monotonic()
        model.close()
        del model
        assert d.proc.wait(15) == 0
        assert time.monotonic() - t0 < 5  # well before the 20 s grace
    assert not d.socket.exists()


def test_prometheus_metrics_on_loopback(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    import urllib.request

    from tests.test_access import free_port

    write_model(tmp_path / "m", 2 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    port = free_port()
    metrics = f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
    with (
        running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], extra_config=metrics) as d,
        d.client() as client,
        client.load(uri) as model,
    ):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        assert samples['tensorferry_loads_total{outcome="ready"}'] == 1
        assert samples[f'tensorferry_fetched_bytes_total{{source="s3://{BUCKET}"}}'] == (
            model.total_bytes
        )
        assert samples["tensorferry_leases"] == 1
        # Fetched, not adopted from a daemon before (test_adoption.py restarts one).
        assert (samples["tensorferry_adopted_models"], samples["tensorferry_adopted_bytes"]) == (
            0,
            0,
        )
        arena = client.list()[0].bytes
        assert samples['tensorferry_resident_bytes{device="cpu",tier="shm"}'] == arena
        assert samples["tensorferry_range_get_seconds_count"] >= 1
        assert samples['tensorferry_time_to_ready_seconds_count{kind="cold"}'] == 1


def test_metrics_refuse_a_non_loopback_address(s3: S3Server) -> None:
    stderr, _ = serve_refused(
        f'[sources]\nallow = ["s3://{BUCKET}/"]\n[metrics]\nlisten = "0.0.0.0:9464"\n',
        daemon_env(s3),
    )
    assert stderr.endswith(
        "tensorferry serve: metrics.listen: 0.0.0.0:9464 is not a loopback host:port"
    )


def test_json_logs_carry_each_load(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    import json

    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    uri = upload(s3, tmp_path / "m", prefix)
    prelude = 'log_format = "json"\n'
    with (
        running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], prelude=prelude) as d,
        d.client() as client,
        client.load(uri) as model,
    ):
        size = model.total_bytes
    docs = [json.loads(line) for line in d.output().splitlines() if line.startswith("{")]
    assert docs
    assert {"time", "level", "logger", "message"} <= set(docs[0])
    (load,) = [doc["load"] for doc in docs if "load" in doc]
    assert load["uri"] == uri
    assert load["outcome"] == "ready"
    assert load["bytes"] == size
    assert load["total_seconds"] > 0
    assert load["gbps"] > 0


def test_doctor_and_config_show(s3: S3Server, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    allow = [f"s3://{BUCKET}/", "s3://no-such-bucket/", str(tmp_path)]
    with running_daemon(daemon_env(s3), allow=allow) as d:
        config = d.log.parent / "tensorferry.toml"
        run = [sys.executable, "-m", "tensorferry"]
        doctor = subprocess.run(
            [*run, "doctor", "--config", str(config), "--socket", str(d.socket)],
            env=daemon_env(s3), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = doctor.stdout.splitlines()
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert f"ok    socket {d.socket}: accepting connections (mode 660)" in lines
        assert f"ok    allowlist s3://{BUCKET}/: listable with the daemon's credentials" in lines
        assert "FAIL  allowlist s3://no-such-bucket/: s3://no-such-bucket/: bucket " in (
            doctor.stdout
        )
        assert f"ok    allowlist {tmp_path}: local directory" in lines
        shown = subprocess.run(
            [*run, "config", "show", "--config", str(config), "--socket", str(d.socket)],
            env=daemon_env(s3), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        settings = json.loads(shown.stdout)
        assert settings["allow"] == allow
        assert settings["s3"]["addressing_style"] == "path"
        assert settings["socket"] == str(d.socket)


def test_disk_tier_reload_needs_no_get(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    from tensorferry.devtools.proxy import CountingProxy, Kind
    from tests.conftest import assert_same_tensors

    write_model(tmp_path / "m", 3 << 20, shards=2, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    cache = f'[cache]\ndir = "{tmp_path / "tier"}"\nbudget = "64MiB"\n'
    with CountingProxy(s3.endpoint) as proxy:
        env = daemon_env(s3, proxy.endpoint)
        for restart in (False, True):  # a reload after an eviction, then after a restart
            with (
                running_daemon(env, allow=[f"s3://{BUCKET}/"], extra_config=cache) as d,
                d.client() as client,
            ):
                if not restart:
                    with client.load(uri) as model:
                        want = dict(model.tensors)
                        first = {k: v.clone() for k, v in want.items()}
                    del want
                    client.evict(uri)
                proxy.reset()
                with client.load(uri) as again:
                    assert_same_tensors(again.tensors, first)
                stats = proxy.stats()
                assert stats.requests[Kind.DATA_GET] == 0
                assert stats.requests[Kind.HEADER_GET] == 0
                assert stats.requests[Kind.OBJECT_GET] == 0
                assert stats.requests[Kind.LIST] == 1  # the version check


def test_pinned_models_are_not_evicted_to_make_room(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uris = {}
    for name in "abc":
        write_model(tmp_path / name, 3 << 20, layer_bytes=1 << 20, seed=ord(name))
        uris[name] = upload(s3, tmp_path / name, f"{prefix}{name}/")
    budget = '[memory]\nshm_budget = "8MiB"\n'
    with (
        running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], extra_config=budget) as d,
        d.client() as client,
    ):
        client.preload(uris["a"], pin=True)  # the least recently used, but pinned
        with client.load(uris["b"]):
            pass
        with client.load(uris["c"]):
            pass
        models = {m.uri: m.pinned for m in client.list()}
        assert models == {uris["a"]: True, uris["c"]: False}


def test_a_misspelt_config_key_stops_start_up(s3: S3Server) -> None:
    stderr, config = serve_refused(
        f'[sources]\nallow = ["s3://{BUCKET}/"]\n[memory]\nshm_budgte = "1GiB"\n',
        daemon_env(s3),
    )
    assert stderr == (
        f"tensorferry serve: config file {config}: unknown key 'memory.shm_budgte' in "
        "[memory]; did you mean 'shm_budget'?"
    )


def test_a_replaced_object_loads_as_a_new_version(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    from safetensors.torch import load_file

    from tests.conftest import assert_same_tensors

    write_model(tmp_path / "v1", 1 << 20, layer_bytes=1 << 19, seed=1)
    write_model(tmp_path / "v2", 1 << 20, layer_bytes=1 << 19, seed=2)
    uri = upload(s3, tmp_path / "v1", prefix)
    with (
        running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"]) as d,
        d.client() as client,
        client.load(uri) as old,
    ):
        upload(s3, tmp_path / "v2", prefix)
        with client.load(uri) as new:
            assert new.model_id != old.model_id
            assert not new.attached
            assert_same_tensors(new.tensors, load_file(tmp_path / "v2" / "model.safetensors"))
        # The old version stays, unchanged, for its lease holder.
        assert_same_tensors(old.tensors, load_file(tmp_path / "v1" / "model.safetensors"))
        assert len(client.list()) == 2
