"""A worker process for the adoption tests: loads models, holds their views, answers on stdin.

Usage: python tests/adoption_worker.py SOCKET [URI ...]
Loads each URI (holding the lease and the views) and prints one JSON line per model
({"uri", "sha256", "attached", "seconds", "wall"}), then the line "held". Then, per stdin line:
  digest               one JSON line per held model: its sha256 recomputed from the views it
                       holds, its lease_end and lease_restores; then "done"
  attach URI N         N loads of URI in a row, each timed and closed: one JSON line
                       {"uri", "sha256", "attached": [...], "seconds": [...], "wall": [...]}
Exits at the end of stdin.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch  # imported before any clock starts, as in a real worker

from tensorferry.client import Client, LoadedModel


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and bytes, in name order (tests/_adoption.py has the
    same for the source files)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def report(model: LoadedModel, uri: str) -> dict[str, object]:
    return {
        "uri": uri, "sha256": digest(model.tensors), "lease_end": model.lease_end,
        "lease_restores": getattr(model, "lease_restores", None),
    }  # fmt: skip


def main() -> None:
    socket, uris = sys.argv[1], sys.argv[2:]
    held: dict[str, LoadedModel] = {}
    with Client(socket) as client:
        for uri in uris:
            t0 = time.perf_counter()
            model = client.load(uri)
            wall = time.perf_counter() - t0
            held[uri] = model
            line = {"uri": uri, "sha256": digest(model.tensors), "attached": model.attached,
                    "seconds": model.seconds, "wall": wall}  # fmt: skip
            print(json.dumps(line), flush=True)
        print("held", flush=True)
        for command in sys.stdin:
            words = command.split()
            if words == ["digest"]:
                for uri, model in held.items():
                    print(json.dumps(report(model, uri)), flush=True)
                print("done", flush=True)
            elif words and words[0] == "attach":
                uri, runs = words[1], int(words[2])
                result: dict[str, object] = {"uri": uri}
                attached, seconds, walls = [], [], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    model = client.load(uri)
                    walls.append(time.perf_counter() - t0)
                    attached.append(model.attached)
                    seconds.append(model.seconds)
                    result["sha256"] = digest(model.tensors)
                    model.close()
                    del model
                result.update(attached=attached, seconds=seconds, wall=walls)
                print(json.dumps(result), flush=True)
            else:
                raise SystemExit(f"adoption_worker: unknown command {command!r}")


if __name__ == "__main__":
    main()
