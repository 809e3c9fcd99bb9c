"""How a soak worker checks what it is handed: each tensor's dtype, shape and sha256 against
the source's (soak_setup.digests), and the set of names against the source's or the
selection's. A mismatch is recorded with the action's figures, never raised: the soak counts
every one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tensorferry.client import LoadedModel
from tensorferry.devtools.soak_setup import describe


class Verifier:
    def __init__(self, plan: dict[str, Any]) -> None:
        #: Model name -> {"uri", "tensors": {name: [dtype, shape, sha256]}}.
        self.plan = plan
        #: Figures of the current action, reported with its end.
        self.figures: dict[str, Any] = {}

    def check(self, model: str, pairs: Iterable[tuple[str, torch.Tensor]], phase: str) -> set[str]:
        """Compare each tensor with the source; mismatches are reported, not raised."""
        want = self.plan[model]["tensors"]
        seen: set[str] = set()
        for name, tensor in pairs:
            seen.add(name)
            expected = want.get(name)
            got = describe(tensor)
            if expected != got:
                what = "unexpected tensor" if expected is None else self._diff(expected, got)
                self.mismatch(model, name, phase, what)
            self.figures["tensors"] = self.figures.get("tensors", 0) + 1
            self.figures["bytes"] = self.figures.get("bytes", 0) + tensor.nbytes
        return seen

    @staticmethod
    def _diff(expected: list[Any], got: list[Any]) -> str:
        fields = ("dtype", "shape", "bytes")
        pairs = zip(fields, expected, got, strict=True)
        return ", ".join(f"{f} {str(g)[:16]!r} != {str(e)[:16]!r}" for f, e, g in pairs if e != g)

    def check_names(self, model: str, seen: set[str], want: set[str], phase: str) -> None:
        for name in sorted(want - seen):
            self.mismatch(model, name, phase, "missing")

    def mismatch(self, model: str, tensor: str, phase: str, what: str) -> None:
        self.figures.setdefault("mismatches", []).append(
            {"model": model, "tensor": tensor, "phase": phase, "what": what[:300]}
        )

    def check_model(self, model: str, loaded: LoadedModel, phase: str) -> None:
        seen = self.check(model, loaded.tensors.items(), phase)
        self.check_names(model, seen, set(self.plan[model]["tensors"]), phase)
        self.figures["verified_loads"] = self.figures.get("verified_loads", 0) + 1
