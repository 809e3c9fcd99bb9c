"""Regenerate the committed protobuf/gRPC code from protos/ (the only way it is made).

Usage: python scripts/gen_protos.py [--check]
--check writes into a temporary folder and fails if the committed files differ.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = Path("tensorferry") / "v1"
OUTPUTS = ("tensorferry_pb2.py", "tensorferry_pb2.pyi", "tensorferry_pb2_grpc.py")


def generate(out_root: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTOS / PACKAGE / "tensorferry.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in OUTPUTS:
            fresh, committed = Path(tmp) / PACKAGE / name, PROTOS / PACKAGE / name
            if check:
                if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                    stale.append(str(committed.relative_to(ROOT)))
            else:
                shutil.copyfile(fresh, committed)
    if stale:
        print("stale generated code: " + ", ".join(stale), file=sys.stderr)
        print("run: python scripts/gen_protos.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
