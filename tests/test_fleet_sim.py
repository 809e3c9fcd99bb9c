"""bench/fleet_sim.py (issue #19): a 2 GB model on 10 and 50 hosts, every scenario."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
MODEL = 2e9
RUN_KEYS = {"scenario", "hosts", "ready_s", "origin_gets", "origin_bytes", "slowdowns",
            "failed_loads", "workers", "sim_s", "wall_s", "cdf_s"}  # fmt: skip


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    # The bench imports its sibling modules by bare name, as bench scripts do.
    sys.path.insert(0, str(BENCH))
    try:
        import fleet_sim

        out = tmp_path_factory.mktemp("fleet") / "sub" / "fleet.json"
        fleet_sim.main(["--model-gb", "2", "--hosts", "10,50", "--json", str(out), "--png", ""])
        yield json.loads(out.read_text())
    finally:
        sys.path.remove(str(BENCH))


def run(result: dict[str, Any], scenario: str, hosts: int) -> dict[str, Any]:
    (row,) = (r for r in result["runs"] if (r["scenario"], r["hosts"]) == (scenario, hosts))
    return row


def test_json_has_the_documented_keys(result: dict[str, Any]) -> None:
    assert set(result) == {"params", "calibration", "runs", "wall_s"}
    assert len(result["runs"]) == 6
    for row in result["runs"]:
        assert set(row) == RUN_KEYS
        assert set(row["ready_s"]) == {"p50", "p90", "p99", "max"}
        assert len(row["cdf_s"]) == row["hosts"]
    assert result["params"]["model_gb"] == 2


def test_origin_sees_one_copy_through_a_tier_and_every_copy_direct(
    result: dict[str, Any],
) -> None:  # fmt: skip
    seeds = result["params"]["seeds"]
    for hosts in (10, 50):
        assert run(result, "direct", hosts)["origin_bytes"] == pytest.approx(hosts * MODEL)
        assert MODEL <= run(result, "cache", hosts)["origin_bytes"] <= 1.1 * MODEL
        assert MODEL <= run(result, "p2p", hosts)["origin_bytes"] <= seeds * MODEL
        assert run(result, "cache", hosts)["origin_gets"] < 1.1 * MODEL / (8 << 20)


def test_slowdowns_only_where_the_prefix_is_overrun(result: dict[str, Any]) -> None:
    # 32 GETs of ~0.13 s in flight per host: ~245 GET/s each. 10 hosts stay under the
    # prefix's 5,500 GET/s (a 2 GB load ends before the pace doubles twice), 50 do not.
    assert run(result, "direct", 10)["slowdowns"] == 0
    assert run(result, "direct", 50)["slowdowns"] > 0
    for hosts in (10, 50):
        assert run(result, "cache", hosts)["slowdowns"] == 0
        assert run(result, "p2p", hosts)["slowdowns"] == 0
        assert run(result, "cache", hosts)["failed_loads"] == 0
    assert run(result, "direct", 10)["failed_loads"] == 0


def test_time_to_ready_orders_the_deployments(result: dict[str, Any]) -> None:
    direct = run(result, "direct", 50)["ready_s"]
    # The prefix's request rate bounds the whole fleet's bytes from below.
    floor = 50 * MODEL / (result["params"]["prefix_rate"] * (8 << 20))
    assert direct["max"] >= floor
    assert run(result, "cache", 50)["ready_s"]["p50"] < direct["p50"]
    assert run(result, "p2p", 50)["ready_s"]["p50"] < direct["p50"]
    assert run(result, "direct", 10)["ready_s"]["p50"] < direct["p50"]
    for row in result["runs"]:
        t = row["ready_s"]
        assert 0 < t["p50"] <= t["p90"] <= t["p99"] <= t["max"]


def test_one_host_matches_the_s3_like_bench(result: dict[str, Any]) -> None:
    """docs/performance.md's measured cold loads through the shaping proxy, within 15%."""
    rows = result["calibration"]
    assert [r["reader"] for r in rows] == [
        "curl, 32 in flight", "curl, 256 in flight", "tensorferry, default config",
    ]  # fmt: skip
    for row in rows:
        assert row["model_s"] == pytest.approx(row["measured_s"], rel=0.15)
    assert rows[2]["workers"] > 32  # the pace grew past its start, as it did there
