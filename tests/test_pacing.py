"""GETs in flight that grow with the link (a jump, doubling), SlowDown shedding and pauses
per bucket, the link rate, gathering slow bytes (#17). Hedging: test_hedging.py."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from tensorferry.daemon.config.settings import S3Settings, Settings
from tensorferry.daemon.doctor import check_link
from tensorferry.daemon.fetch.link import LinkRate, link_rate
from tensorferry.daemon.fetch.pacing import Pace
from tensorferry.daemon.store._http_conn import LOWAT
from tensorferry.daemon.store.throttle import MIN_PAUSE, BucketThrottle, Throttles
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import assert_clean, daemon_env, load_once, running_daemon, upload


def test_the_pace_doubles_while_throughput_rises_and_takes_back_a_step_that_did_not_pay() -> None:
    pace = Pace(start=4, ceiling=64)
    t, total = 10.0, 0
    assert pace.sample(total, t) == 4  # the first sample opens a window...
    t, total = t + 1, total + 5
    assert pace.sample(total, t) == 4  # ...the load's start is not counted
    for rate in (40, 60, 90):  # each doubling paid (by half: a link shared, not capped)
        before = pace.workers
        t, total = t + 1, total + rate
        assert pace.sample(total, t) == 2 * before
        t, total = t + 1, total + rate  # the new connections' first interval: not counted
        assert pace.sample(total, t) == 2 * before
    assert pace.workers == 32
    t, total = t + 1, total + 108  # +20% for twice the GETs: no
    assert pace.sample(total, t) == 16
    assert pace.settled
    assert pace.sample(total + 500, t + 1) == 16  # settled for the rest of the load


def test_the_pace_quadruples_after_a_step_that_nearly_doubled_throughput() -> None:
    pace = Pace(start=32, ceiling=256)
    pace.sample(0, 10.0)
    pace.sample(0, 10.5)
    assert pace.sample(100, 11.0) == 64  # the first step is always a doubling
    pace.sample(100, 11.5)  # its new connections' first interval
    assert pace.sample(300, 12.0) == 256  # 200 against 100 B per window: x4
    pace.sample(300, 12.5)
    assert pace.sample(540, 13.0) == 64  # +20% for 4x the GETs: taken back
    assert pace.settled


def test_the_pace_stops_at_the_target_rate_and_the_ceiling() -> None:
    pace = Pace(start=2, ceiling=64, target_bps=100.0)
    pace.sample(0, 10.0)
    pace.sample(0, 11.0)
    assert pace.sample(100, 12.0) == 2  # 100 B/s: the target
    assert pace.settled
    capped = Pace(start=2, ceiling=3)
    capped.sample(0, 10.0)
    capped.sample(0, 10.5)
    assert capped.sample(10, 11.0) == 3
    capped.sample(20, 12.0)  # the new connection's first interval
    assert capped.sample(60, 13.0) == 3  # it paid, and 3 is the ceiling
    assert capped.settled


def test_the_pace_does_not_grow_on_windows_in_which_nothing_arrived() -> None:
    # A bucket paused by SlowDown delivers nothing: that is no reason for more GETs.
    pace = Pace(start=4, ceiling=64)
    pace.sample(0, 10.0)
    pace.sample(0, 11.0)
    for t in (12.0, 13.0, 14.0):
        assert pace.sample(0, t) == 4
    assert not pace.settled
    assert pace.sample(100, 15.0) == 8  # bytes flow again: the first real sample steps
    pace.sample(100, 16.0)  # the step's new connections: not counted
    assert pace.sample(100, 17.0) == 8  # a pause after the step is not judged either
    assert pace.sample(250, 18.0) == 16  # 150 B/s against 100: it paid


def test_the_first_step_jumps_to_what_the_links_rate_needs_and_is_judged_like_any_step() -> None:
    # 32 GETs bring 40 MB/s in the load's first half second: 1.25 GB/s needs 1,000.
    pace = Pace(start=32, ceiling=256, link_bps=1.25e9, started=10.0)
    assert pace.sample(0, 10.5) == 32  # nothing yet (first bytes late): ask again
    assert pace.sample(40_000_000, 11.0) == 256
    pace.sample(40_000_000, 11.5)  # the new connections' first interval
    assert pace.sample(140_000_000, 12.0) == 256  # 200 MB/s: it paid; the ceiling
    assert pace.settled
    # Where the jump did not pay (a store that throttles, a slower link than believed),
    # back to the start, then doubling as without a jump.
    back = Pace(start=32, ceiling=256, link_bps=1.25e9, started=10.0)
    assert back.sample(20_000_000, 10.5) == 256
    back.sample(20_000_000, 11.0)
    assert back.sample(40_000_000, 11.5) == 32  # 40 MB/s: no better
    assert not back.settled
    back.sample(40_000_000, 12.0)  # the start again: not counted
    assert back.sample(60_000_000, 12.5) == 64  # the first doubling is always taken
    back.sample(70_000_000, 13.0)
    assert back.sample(85_000_000, 13.5) == 32  # 30 MB/s against 40: taken back, settled
    assert back.settled


def test_no_jump_when_the_link_is_nearly_filled_or_unknown() -> None:
    # Loopback: 32 GETs at 0.5 GB/s against a 1.25 GB/s link: 2.5x, doubling finds that.
    near = Pace(start=32, ceiling=256, link_bps=1.25e9, started=10.0)
    assert near.sample(250_000_000, 10.5) == 32
    near.sample(500_000_000, 11.0)  # the load's start is still not counted
    assert near.sample(750_000_000, 11.5) == 64  # the usual first step
    unknown = Pace(start=32, ceiling=256, started=10.0)
    assert unknown.sample(1_000, 10.5) == 32
    # A jump never passes the ceiling (the model's ranges, max_concurrency).
    few = Pace(start=4, ceiling=10, link_bps=1e9, started=0.0)
    assert few.sample(1_000, 0.5) == 10


def test_the_link_rate_is_the_config_then_the_fastest_nic_then_assumed(tmp_path: Path) -> None:
    def nic(name: str, speed: str, state: str = "up", physical: bool = True) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "speed").write_text(speed + "\n")
        (tmp_path / name / "operstate").write_text(state + "\n")
        if physical:
            (tmp_path / name / "device").mkdir()

    assert link_rate(0, tmp_path) == LinkRate(
        1.25e9, "assumed: no NIC reports its speed; [s3] target_rate sets it"
    )
    nic("lo", "100000", "unknown", physical=False)  # loopback: no device
    nic("eth0", "-1")  # virtio: no speed
    nic("eth1", "25000")
    nic("eth2", "100000", state="down")
    nic("eth3", "10000")
    assert link_rate(0, tmp_path) == LinkRate(25e9 / 8, "eth1's reported speed")
    assert link_rate(0, tmp_path).describe() == "25 Gb/s (eth1's reported speed)"
    assert link_rate(3 << 30, tmp_path) == LinkRate(3 << 30, "[s3] target_rate")


def test_doctor_says_what_loads_are_sized_for(tmp_path: Path) -> None:
    lines: list[tuple[str, str, str]] = []
    check_link(Settings(), lambda *line: lines.append(line), tmp_path)  # no NIC reports
    check_link(Settings(s3=S3Settings(target_rate=11 << 30)), lambda *line: lines.append(line))
    assert lines == [
        ("warn", "link: 10 Gb/s (assumed: no NIC reports its speed; [s3] target_rate sets it)",
         'set [s3] target_rate to what this host\'s network carries (e.g. "11GiB" for 100 '
         "Gb/s): loads size their GETs in flight for it"),
        ("ok", "link: 94.5 Gb/s ([s3] target_rate)", ""),
    ]  # fmt: skip


async def test_a_slowdown_pauses_every_load_of_that_bucket_only() -> None:
    throttles = Throttles()
    a, b = throttles.of("models"), throttles.of("other")
    assert throttles.of("models") is a
    a.slow_down()
    t0 = time.monotonic()
    await b.wait()
    assert time.monotonic() - t0 < MIN_PAUSE / 4  # another bucket is not paused
    await a.wait()
    assert time.monotonic() - t0 >= MIN_PAUSE / 2
    a.slow_down()
    assert a.delay == 2 * MIN_PAUSE  # in a row: doubles
    a.ok()
    a.ok()
    assert a.delay == 0.0
    assert throttles.slowdowns == 2
    assert BucketThrottle().delay == 0.0


def test_gets_in_flight_grow_when_each_connection_is_slow(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 40 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)

    def slow_link(req: RequestInfo) -> Fault | None:
        # 64 KiB per 16 ms: 4 MB/s per connection, as a far object store gives a few.
        return Fault(stall=0.02, trickle=0.016) if req.kind is Kind.DATA_GET else None

    # The link's rate is set: the host's NIC may or may not report one.
    config = 'chunk_size = "1MiB"\nconcurrency = 2\nmax_concurrency = 24\ntarget_rate = "1GiB"'
    with (
        CountingProxy(s3.endpoint, fault=slow_link) as proxy,
        running_daemon(daemon_env(s3, proxy.endpoint), allow=[uri], s3_config=config) as d,
        d.client() as client,
    ):
        with client.load(uri) as model:
            assert len(model.tensors) > 0
        [record] = client.status().recent_loads
        # Two connections give 8 MB/s of the link's 1.07 GB/s: the first step jumps to the
        # ceiling, and it paid.
        assert record.workers == 24, record
        assert record.hedges == 0
        del model
        assert_clean(d)
        log = d.log.read_text()
    assert proxy.stats().requests[Kind.DATA_GET] >= 40
    assert re.search(
        rf"{re.escape(uri)}: 2 -> 24 GETs in flight \(a jump: [\d.]+ MB/s from 2 GETs, the "
        r"link takes 1074 MB/s\)", log), log  # fmt: skip


def test_slowdowns_halve_the_gets_in_flight(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 24 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    lock, ranges = threading.Lock(), []

    def throttled(req: RequestInfo) -> Fault | None:
        first, last = map(int, req.headers.get("range", "bytes=0-0")[6:].split("-"))
        if req.kind is not Kind.DATA_GET or last - first + 1 < 1 << 20:
            return None  # headers: the load's plan, not its ranges
        with lock:
            ranges.append(first)
            n = len(ranges)
        # 4 MB/s per connection, and a throttled prefix's answer to four GETs at once.
        return Fault(status=503, s3_code="SlowDown") if 5 <= n <= 8 else Fault(trickle=0.016)

    # Four GETs at 4 MB/s each jump to the ceiling of eight (the link takes 1.07 GB/s),
    # unless the store has said no by then; either way it says no before long.
    config = 'chunk_size = "1MiB"\nconcurrency = 4\nmax_concurrency = 8\ntarget_rate = "1GiB"'
    record, _ = load_once(s3, uri, throttled, config)
    assert (record.outcome, record.retries) == ("ready", 4)
    assert record.workers == 4  # half the GETs in flight, not below the start, no growth


def test_bytes_the_kernel_gathers_on_a_slow_connection_are_no_idle_store(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 8 << 20, layer_bytes=4 << 20)
    uri = upload(s3, tmp_path / "m", prefix)

    def slow(req: RequestInfo) -> Fault | None:
        return Fault(trickle=0.05) if req.kind is Kind.DATA_GET else None

    # 64 KiB every 0.05 s: each comes within the read timeout, but the kernel takes 0.8 s to
    # gather LOWAT (1 MiB of a 4 MiB range) before it wakes the daemon: past the timeout.
    assert LOWAT == 1 << 20
    config = 'chunk_size = "4MiB"\nconcurrency = 2\nmax_concurrency = 2\nread_timeout = 0.5'
    record, _ = load_once(s3, uri, slow, config)
    assert (record.outcome, record.retries) == ("ready", 0), record


def test_a_slowdown_pauses_the_buckets_next_get(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 8 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    answered: list[float] = []

    def slowdown_once(req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET:
            return None
        answered.append(time.monotonic())
        return Fault(status=503, s3_code="SlowDown") if len(answered) == 3 else None

    config = 'chunk_size = "1MiB"\nconcurrency = 1\nmax_concurrency = 1'
    with (
        CountingProxy(s3.endpoint, fault=slowdown_once) as proxy,
        running_daemon(daemon_env(s3, proxy.endpoint), allow=[uri], s3_config=config) as d,
        d.client() as client,
    ):
        with client.load(uri) as model:
            assert len(model.tensors) > 0
        [record] = client.status().recent_loads
        assert record.retries == 1
        # One GET in flight: the next one waited out the bucket's pause.
        assert answered[3] - answered[2] >= MIN_PAUSE / 2
        del model
        assert_clean(d)
    assert proxy.stats().requests[Kind.DATA_GET] == len(answered)
