"""What makes two requests the same resident model.

Two loads share one arena when they read the same weight objects at the same version,
select the same tensors, and land on the same device with the same rank. The URI a worker
typed is not part of it: a directory and its single ``model.safetensors`` are one model,
and so are ``select=["model.layers.*"]`` and ``["model.layers.*", "model.layers.0.*"]``.
Non-weight files (config.json, tokenizer files) are not part of it either: editing them
must not re-fetch the weights.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable

from tensorferry.daemon.planner import selector
from tensorferry.daemon.source import is_weight_object, listing_version
from tensorferry.daemon.store.base import ObjectInfo

#: Sources whose tensor names are remembered for resolving selections without a GET.
NAMES_KEPT = 64


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def weights_id(store_uri: str, listing: list[ObjectInfo]) -> str:
    """The store location and the names of its weight objects, as one comparable string."""
    keys = sorted(o.key for o in listing if is_weight_object(o.key))
    return f"{store_uri.rstrip('/')}/#{_digest(keys)}"


weights_version = listing_version


def normalize_patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Order and repeats of patterns never change what they select."""
    return tuple(sorted(set(patterns)))


class TensorNames:
    """All tensor names of recently read sources, by (weights id, version).

    A selection is keyed by the set of names it resolves to; with the names remembered,
    a second worker attaching with other but equivalent patterns needs no header read.
    """

    def __init__(self, keep: int = NAMES_KEPT) -> None:
        self._keep = keep
        self._names: collections.OrderedDict[tuple[str, str], tuple[str, ...]] = (
            collections.OrderedDict()
        )

    def remember(self, source: tuple[str, str], names: Iterable[str]) -> None:
        self._names[source] = tuple(names)
        self._names.move_to_end(source)
        while len(self._names) > self._keep:
            self._names.popitem(last=False)

    def known(self, source: tuple[str, str]) -> bool:
        return source in self._names

    def get(self, source: tuple[str, str]) -> tuple[str, ...]:
        """The names of ``source`` when known (for a sealed arena's manifest), else ()."""
        return self._names.get(source, ())

    def selection_key(self, source: tuple[str, str], patterns: tuple[str, ...]) -> tuple[str, ...]:
        """``()`` for everything, else a digest of the selected names.

        Falls back to the normalised patterns when the source's names are not known.
        """
        patterns = normalize_patterns(patterns)
        names = self._names.get(source)
        if not patterns or names is None:
            return patterns
        self._names.move_to_end(source)
        wanted = selector(patterns)
        chosen = [n for n in names if wanted(n)]
        if len(chosen) == len(names):
            return ()
        return (f"tensors#{_digest(sorted(chosen))}",)
