"""Models of many tensors load without holding the daemon's event loop (#25, defect 9).

Big headers and indexes are parsed in a child process, never in the daemon's (a thread's
parse holds the GIL, and its garbage collections the loop, for 100 ms at a time); the plan
is made on the loop in steps, so Status and leases are answered between them. The figures
(Status latency through such a load) come from bench/bench_loop_lag.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest

import tensorferry.format.index as index
import tensorferry.format.safetensors as safetensors
from tensorferry.daemon.offload import OFFLOAD_BYTES
from tensorferry.daemon.planner import STEP, make_plan, plan_load
from tensorferry.daemon.source import (
    INDEX_NAME,
    Source,
    SourceRef,
    list_source,
    parse_uri,
    read_source,
)
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.daemon.store.local import LocalStore
from tensorferry.errors import InvalidArtifact
from tensorferry.format.safetensors import Entries, Header, parse_header


def write_shard(path: Path, first: int, count: int, metadata: bool = False) -> bytes:
    """A safetensors file of ``count`` F32 tensors of 4 elements; its header."""
    entries = [b'"__metadata__":{"format":"pt"}'] if metadata else []
    for i in range(count):
        begin = 16 * i
        entries.append(b'"model.layers.%d.experts.%d.weight":{"dtype":"F32","shape":[2,2],'
                       b'"data_offsets":[%d,%d]}' % ((first + i) // 1000, first + i, begin,
                                                    begin + 16))  # fmt: skip
    raw = b"{" + b",".join(entries) + b"}"
    header = struct.pack("<Q", len(raw)) + raw
    path.write_bytes(header + bytes(range(256)) * (count // 16) + bytes(16 * (count % 16)))
    return header


def local_store(directory: Path) -> tuple[SourceRef, LocalStore]:
    ref = parse_uri(str(directory) + "/")
    assert ref.path is not None
    return ref, LocalStore(ref.path, ref.uri)


def children() -> list[int]:
    """This process's children that parse for it."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # it ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"offload" in cmdline:
            found.append(int(pid))
    return found


def refuse(raw: bytes, hook: safetensors.DuplicateKeys) -> object:
    raise AssertionError(f"{len(raw)} bytes of JSON were parsed in the daemon's process")


async def test_a_big_header_and_index_are_parsed_in_a_child(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    n = 25_000
    headers = [write_shard(m / f"s{k}.safetensors", k * n, n, metadata=k == 0) for k in (0, 1)]
    weight_map = {f"model.layers.{i // 1000}.experts.{i}.weight": f"s{i // n}.safetensors"
                  for i in range(2 * n)}  # fmt: skip
    (m / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    assert min(len(h) for h in headers) >= OFFLOAD_BYTES
    assert (m / INDEX_NAME).stat().st_size >= OFFLOAD_BYTES
    want = [parse_header(h, f"{m}/s{k}.safetensors", (m / f"s{k}.safetensors").stat().st_size)
            for k, h in enumerate(headers)]  # fmt: skip
    ref, store = local_store(m)
    with pytest.MonkeyPatch.context() as patch:
        # JSON parsing of headers and indexes fails in this process: only a child may.
        patch.setattr(safetensors, "loads", refuse)
        patch.setattr(index, "loads", refuse)
        source = await read_source(ref, store, await list_source(ref, store))
    got = [header for _, header in source.files]
    assert [h.metadata for h in got] == [{"format": "pt"}, {}]
    for g, w in zip(got, want, strict=True):
        assert (g.data_start, g.data_len) == (w.data_start, w.data_len)
        assert g.tensors == w.tensors
    assert len(list(source.names())) == 2 * n


async def test_a_big_header_refused_in_the_child_keeps_its_reason(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    header = write_shard(m / "model.safetensors", 0, 30_000)
    assert len(header) >= OFFLOAD_BYTES
    # The same tensor twice, as the last entry: the child finds it after 2 MB of JSON.
    raw = header[8:-1] + b',"model.layers.0.experts.0.weight":{"dtype":"F32","shape":[4],' \
        b'"data_offsets":[0,16]}}'  # fmt: skip
    (m / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16 * 30_000))
    ref, store = local_store(m)
    with pytest.raises(InvalidArtifact) as info:
        await read_source(ref, store, await list_source(ref, store))
    assert info.value.message == (
        f"{m}/model.safetensors is not a valid safetensors file: tensor "
        "'model.layers.0.experts.0.weight' appears twice in its header"
    )


async def test_a_cancelled_parse_ends_its_child(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    write_shard(m / "model.safetensors", 0, 200_000)
    ref, store = local_store(m)
    listing = await list_source(ref, store)
    task = asyncio.create_task(read_source(ref, store, listing))
    while not children():
        assert not task.done(), "the header was parsed without a child process"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert children() == []


def many(count: int) -> Header:
    names = [f"model.layers.{i // 1000}.experts.{i}.weight" for i in range(count)]
    entries = Entries(
        names, ["F32"] * count, [(2, 2)] * count, list(range(0, 16 * count, 16)),
        list(range(16, 16 * count + 16, 16)),
    )  # fmt: skip
    return Header(8, 16 * count, entries, {})


async def test_planning_many_tensors_lets_the_loop_run_between_steps() -> None:
    count = 200_000
    obj = ObjectInfo("model.safetensors", 8 + 16 * count, "e")
    source = Source(SourceRef("/m/", "local"), ((obj, many(count)),), (), "v")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        ticker = tg.create_task(tick())
        await asyncio.sleep(0)
        before = ticks
        plan = await plan_load(source, 8 << 20)
        ran = ticks - before
        ticker.cancel()
    # One tick per step at least: the loop ran other work every STEP tensors.
    assert ran >= count // STEP, f"the loop ran {ran} times while {count} tensors were planned"
    assert plan == make_plan(source, 8 << 20)
