"""Property-based tests (fixed budget) over untrusted input: headers, URIs, selections."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorferry.daemon.config.settings import Settings
from tensorferry.daemon.planner import make_plan
from tensorferry.daemon.rpc.validation import check_select
from tensorferry.daemon.source import Source, check_allowed, parse_uri
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.errors import AccessDenied, InvalidArtifact, InvalidRequest, SourceNotAllowed
from tensorferry.format.safetensors import DTYPE_SIZES, parse_header

BUDGET = settings(max_examples=300, deadline=None, derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)  # fmt: skip
tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPE_SIZES, "F4X", "", 7]),
        "shape": st.lists(st.integers(-2, 9), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 300), min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(st.text(max_size=6), tensor_entries | json_values, max_size=6)


@BUDGET
@given(
    doc=headers,
    data=st.binary(max_size=300),
    garbage=st.booleans(),
    length_delta=st.integers(-3, 3),
)
def test_header_parser_accepts_only_consistent_headers(
    doc: dict[str, object], data: bytes, garbage: bool, length_delta: int
) -> None:  # fmt: skip
    raw = json.dumps(doc).encode()
    if garbage:
        raw = raw[: len(raw) // 2]
    blob = struct.pack("<Q", max(len(raw) + length_delta, 0)) + raw + data
    try:
        header = parse_header(blob, "k", len(blob))
    except InvalidArtifact as exc:
        message = exc.message
    else:
        message = ""
    if message:  # refused, naming the file
        assert message.startswith(("k ", "k:"))
        return
    # Whatever parses is safe to plan: in bounds, sized by shape, no overlaps.
    previous_end = 0
    for t in header.tensors:
        assert 0 <= t.begin <= t.end <= header.data_len
        if t.nbytes:
            assert t.begin >= previous_end
            previous_end = t.end
    source = Source(parse_uri("s3://b/m/"), ((ObjectInfo("k", len(blob), "e"), header),), (), "v")
    plan = make_plan(source, 64 << 10)
    for pt in plan.tensors:
        assert pt.offset + pt.nbytes <= plan.arena_size
        assert pt.offset % DTYPE_SIZES[pt.dtype] == 0
    assert sum(r.length for r in plan.ranges) >= plan.tensor_bytes


@BUDGET
@given(
    uri=st.text(max_size=40) | st.from_regex(r"s3://[a-z./]{0,12}/[a-z./]{0,20}", fullmatch=True)
)
def test_uris_parse_or_fail_with_invalid_request(uri: str) -> None:
    try:
        ref = parse_uri(uri)
    except InvalidRequest:
        return
    assert ref.scheme in ("s3", "local")
    if ref.scheme == "s3":
        assert ".." not in ref.prefix.split("/")
    else:
        assert ref.path is not None
        assert ref.path.is_absolute()
        assert ".." not in ref.path.parts


@BUDGET
@given(tail=st.lists(st.sampled_from(["..", ".", "x", "models-evil", "", "m"]), max_size=6))
def test_allowlist_never_admits_an_escape(tail: list[str]) -> None:
    settings_ = Settings(allow=("s3://b/models/", "/srv/models"))
    for uri in (f"s3://b/models/{'/'.join(tail)}", f"/srv/models/{'/'.join(tail)}"):
        try:
            ref = parse_uri(uri)
            check_allowed(ref, settings_)
        except (InvalidRequest, SourceNotAllowed):
            continue
        if ref.scheme == "s3":
            assert ref.uri.startswith("s3://b/models/")
        else:
            assert ref.path is not None
            assert ref.path == Path("/srv/models") or Path("/srv/models") in ref.path.parents


@BUDGET
@given(patterns=st.lists(st.text(max_size=20), max_size=20))
def test_selections_are_validated(patterns: list[str]) -> None:
    try:
        result = check_select(patterns)
    except InvalidRequest:
        assert any(not p or len(p) > 1024 for p in patterns)
        return
    assert result == tuple(sorted(set(patterns)))


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(name=st.sampled_from(["link", "../outside", "inside", "sub/inside"]))
def test_local_symlinks_cannot_escape_the_root(tmp_path: Path, name: str) -> None:
    import asyncio

    from tensorferry.daemon.store.local import LocalStore

    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"secret")
    (root / "inside").write_bytes(b"fine")
    link = root / "link"
    if not link.is_symlink():
        os.symlink(secret, link)
    store = LocalStore(root.resolve(), str(root) + "/")
    listed = {o.key for o in asyncio.run(store.list_objects())}
    assert listed == {"inside"}
    obj = ObjectInfo(name, 6, "x")
    if name != "inside":
        with pytest.raises((InvalidRequest, AccessDenied)):
            asyncio.run(store.read(obj, 0, 4))


@BUDGET
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
    pick=st.lists(st.booleans(), min_size=8, max_size=8),
    chunk=st.sampled_from([1024, 4096]),
)
def test_ranges_never_straddle_a_chunk_boundary_of_the_object(
    sizes: list[int], pick: list[bool], chunk: int
) -> None:  # fmt: skip
    # Stores keep objects as aligned parts: a range across a boundary costs the server twice.
    doc, offset = {}, 0
    for i, n in enumerate(sizes):
        doc[f"t{i}"] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(doc).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(offset)
    header = parse_header(blob, "k", len(blob))
    source = Source(parse_uri("s3://b/m/"), ((ObjectInfo("k", len(blob), "e"), header),), (), "v")
    select = tuple(f"t{i}" for i in range(len(sizes)) if pick[i]) or ("t0",)
    plan = make_plan(source, chunk, select)
    for r in plan.ranges:
        assert 0 < r.length <= chunk
        assert r.start // chunk == (r.start + r.length - 1) // chunk
    covered = sorted((r.start, r.start + r.length) for r in plan.ranges)
    wanted = sum(sizes[i] for i in range(len(sizes)) if f"t{i}" in select)
    assert sum(end - begin for begin, end in covered) == wanted
    # Only a cut forced by a boundary splits a run: at most one range per chunk touched.
    touched = {b // chunk for begin, end in covered for b in range(begin, end)}
    assert len(plan.ranges) <= len(touched) + len(select)
