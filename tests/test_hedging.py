"""Stragglers asked for again: range and first-byte deadlines, the crowd rule, spares (#17)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tensorferry.daemon.fetch.hedging import MIN_HEDGE_SECONDS, SLOW, Hedger
from tensorferry.daemon.store.base import GetTiming
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import Fault, FaultHook, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import load_once, upload


def test_a_hedge_needs_samples_and_a_share_of_the_ranges() -> None:
    hedger = Hedger(ranges=40)  # 5%: two hedges
    for _ in range(7):
        hedger.observe(0.2)
    assert hedger.deadline() is None  # not enough samples yet
    hedger.observe(0.2)
    assert hedger.deadline() == pytest.approx(max(MIN_HEDGE_SECONDS, 0.2 * SLOW))
    hedger.hedged = 2
    assert hedger.deadline() is None
    assert not hedger.may_start()


def test_a_first_byte_hedge_needs_first_byte_samples() -> None:
    hedger = Hedger(ranges=100)
    for _ in range(8):
        hedger.observe(5.0)  # slow ranges...
        GetTiming(sent=1.0, on_first_byte=hedger.observe_first_byte).answered(1.03)  # quick heads
    assert hedger.deadline() == pytest.approx(20.0)
    assert hedger.first_byte_deadline() == MIN_HEDGE_SECONDS  # 4 x 30 ms is under the floor
    # The median, not the tail: a busy store's late heads must not hide a stall of 2 s.
    busy = Hedger(ranges=100)
    for head in (0.3, 0.3, 0.3, 0.3, 0.3, 0.6, 0.6, 0.6, 0.6):
        GetTiming(sent=1.0, on_first_byte=busy.observe_first_byte).answered(1.0 + head)
    assert busy.first_byte_deadline() == pytest.approx(4 * 0.3)
    # Many GETs late at once is congestion, not a straggler: no first-byte hedge then.
    busy.live = {GetTiming(sent=1.0, first_byte=1.3) for _ in range(9)}
    busy.live |= {GetTiming(sent=1.0) for _ in range(3)}
    busy.live |= {GetTiming(sent=3.0) for _ in range(20)}  # a burst just sent: not judged
    assert not busy.crowded(1.2, now=3.1)  # 3 of 12 late: stalled answers, hedged
    busy.live.add(GetTiming(sent=1.0))
    assert busy.crowded(1.2, now=3.1)  # 4 of 13: more than a quarter
    unsent = Hedger(ranges=100)
    for _ in range(8):
        unsent.observe(5.0)
        GetTiming(on_first_byte=unsent.observe_first_byte).answered(1.0)  # never sent: no sample
    assert unsent.first_byte_deadline() is None


def nth_data_get(n: int, fault: Fault, others: Fault | None = None) -> tuple[FaultHook, list[str]]:
    """A hook that gives the n-th data GET ``fault`` and every other one ``others``; the
    ranges asked for, in order."""
    seen: list[str] = []
    lock = threading.Lock()

    def hook(req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET:
            return None
        with lock:
            seen.append(req.headers["range"])
            return fault if len(seen) == n else others

    return hook, seen


def test_a_straggling_range_is_hedged_and_the_load_does_not_wait_for_it(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 24 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    hook, seen = nth_data_get(12, Fault(truncate_after=0, hang=True))
    # Without the hedge the hung GET would hold the load for read_timeout (60 s).
    config = 'chunk_size = "1MiB"\nconcurrency = 2\nmax_concurrency = 2\nread_timeout = 60'
    t0 = time.monotonic()
    record, gets = load_once(s3, uri, hook, config)
    assert time.monotonic() - t0 < 30
    assert gets == len(seen)
    assert (record.outcome, record.hedges, record.retries) == ("ready", 1, 0)
    assert seen.count(seen[11]) == 2  # the hung range, asked again
    assert record.workers == 2


def test_a_get_whose_first_byte_does_not_come_is_hedged_long_before_the_range_deadline(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 16 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    # Every range takes about 2 s (a slow link), so the range-time rule would hedge only
    # after 8 s; the 12th range gets no answer at all for 30 s.
    hook, seen = nth_data_get(12, Fault(stall=30.0), others=Fault(trickle=0.125))
    config = 'chunk_size = "1MiB"\nconcurrency = 4\nmax_concurrency = 4\nread_timeout = 60'
    record, gets = load_once(s3, uri, hook, config)
    assert gets == len(seen)
    assert (record.outcome, record.hedges, record.retries) == ("ready", 1, 0)
    assert seen.count(seen[11]) == 2  # the silent range, asked again
    # Hedged half a second after it was sent: the load takes what its ranges need at four
    # in flight (about 4 x 2 s + the hedge's 2 s), not the 8 s of the range rule.
    assert record.fetch_seconds < 12, record
