"""What the vLLM loader needs that does not need vLLM: its options, the weights stream with
our errors, a pipeline stage's selection, and the config files a serve directory needs.

Kept apart from ``tensorferry.integrations.vllm`` (which subclasses vLLM's loader) so that
these parts are tested, and the files command runs, where vLLM is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorferry.errors import InvalidArtifact, InvalidRequest, SourceNotFound, TensorferryError

if TYPE_CHECKING:
    import torch

    from tensorferry.client import Client

ACCEPTED_KEYS = ("uri", "device", "select", "timeout", "client_name", "keep_gpu_copy")
#: What vLLM reads from a model directory besides the weights (those a source lacks are
#: skipped): the model's config, generation defaults and the tokenizer.
SERVE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "model.safetensors.index.json",
)  # fmt: skip
INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """``--model-loader-extra-config`` of ``--load-format tensorferry``."""

    #: The weights' source; empty: the model path vLLM was given.
    uri: str = ""
    #: "cpu" (a shared-memory arena, the default) or "cuda" (this rank's GPU).
    device: str = "cpu"
    select: tuple[str, ...] = ()
    #: Seconds to wait for the model to become resident (None: as long as it takes).
    timeout: float | None = None
    client_name: str = ""
    #: With device "cuda": keep the daemon's GPU copy resident after the engine copied it
    #: (the default evicts it, so that vLLM's next start finds the GPU memory free).
    keep_gpu_copy: bool = False

    @classmethod
    def parse(cls, extra: Mapping[str, Any] | None) -> LoaderOptions:
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(ACCEPTED_KEYS))
        if unknown:
            raise InvalidRequest(
                f"--model-loader-extra-config for --load-format tensorferry has unknown "
                f"key(s) {', '.join(unknown)}; accepted: {', '.join(ACCEPTED_KEYS)}"
            )
        uri = extra.get("uri", "")
        device = extra.get("device", "cpu")
        select = extra.get("select", ())
        timeout = extra.get("timeout")
        name = extra.get("client_name", "")
        keep = extra.get("keep_gpu_copy", False)
        if not isinstance(uri, str) or not isinstance(name, str):
            raise InvalidRequest("tensorferry loader: uri and client_name must be strings")
        if device not in ("cpu", "cuda"):
            raise InvalidRequest(
                f'tensorferry loader: device must be "cpu" or "cuda", not {device!r}'
            )
        if isinstance(select, str):
            select = (select,)
        if not isinstance(select, list | tuple) or not all(isinstance(s, str) for s in select):
            raise InvalidRequest("tensorferry loader: select must be a list of tensor patterns")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise InvalidRequest(
                f"tensorferry loader: timeout must be a positive number of seconds, not {timeout!r}"
            )
        if not isinstance(keep, bool):
            raise InvalidRequest(
                f"tensorferry loader: keep_gpu_copy must be true or false, not {keep!r}"
            )
        seconds = None if timeout is None else float(timeout)
        return cls(uri, device, tuple(select), seconds, name, keep)

    def source(self, model_path: str) -> str:
        """The URI to load: ``uri``, else the model path vLLM was given."""
        return self.uri or model_path


class Weights:
    """The tensors of a load as vLLM's ``load_weights`` takes them, remembering which one
    is being handed over, so an error inside vLLM's weight loaders can name it."""

    def __init__(
        self, pairs: Iterable[tuple[str, torch.Tensor]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pairs = pairs
        self.clock = clock
        self.current: tuple[str, torch.Tensor] | None = None
        self.count = 0
        self.bytes = 0
        self.names: set[str] = set()
        #: Monotonic times: created, first tensor handed over, last one taken back.
        self.started = clock()
        self.first = self.last = 0.0
        #: Seconds spent waiting for the next tensor once the first had come (the rest of
        #: the time from the first to the last is vLLM's copying).
        self.waited = 0.0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        pairs = iter(self._pairs)
        while True:
            t0 = self.clock()
            pair = next(pairs, None)
            now = self.clock()
            if self.first:  # the wait for the first one is its own figure, ``first``
                self.waited += now - t0
            if pair is None:
                break
            name, tensor = pair
            self.first = self.first or now
            self.current = (name, tensor)
            self.count += 1
            self.bytes += tensor.numel() * tensor.element_size()
            self.names.add(name)
            yield name, tensor
        self.current = None
        self.last = self.clock()
        self._pairs = ()  # the stream holds the arena's mapping: not past the load

    def mismatch(self, uri: str, exc: BaseException) -> TensorferryError:
        """vLLM refused the tensor being handed over (shape, dtype): say which."""
        if isinstance(exc, TensorferryError) or self.current is None:
            return exc if isinstance(exc, TensorferryError) else InvalidArtifact(str(exc))
        name, tensor = self.current
        detail = str(exc).strip() or type(exc).__name__
        return InvalidArtifact(
            f"{uri}: tensor {name} (shape {list(tensor.shape)}, {tensor.dtype}) does not fit "
            f"the model vLLM built from its config: {detail}; the checkpoint and config.json "
            "must describe the same model"
        )


def loaded_line(weights: Weights, uri: str, *, since: float, attached: bool) -> str:
    """The loader's log line once ``weights`` are in the model (``since``: the request).
    Its three parts add up to the time until the last tensor was taken: to the first
    tensor, waiting for the others, and vLLM copying them."""
    now = weights.clock()
    first = weights.first or weights.last or now  # no tensor: no copying either
    copying = (weights.last or now) - first - weights.waited
    how = "attached to the resident model" if attached else "streamed as they landed"
    return (
        f"tensorferry: {weights.count} tensors ({weights.bytes / 1e9:.3f} GB) from {uri} into "
        f"the model in {now - since:.2f} s ({how}; first tensor at {first - since:.2f} s, "
        f"{weights.waited:.2f} s waiting for tensors, {copying:.2f} s copying)"
    )


def missing_error(uri: str, missing: Iterable[str]) -> InvalidArtifact:
    names = sorted(missing)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return InvalidArtifact(
        f"{uri} lacks tensors the model needs: {shown}; the checkpoint and config.json must "
        "describe the same model (or widen the loader's select)"
    )


def stage_selection(index_json: bytes, layers: Iterable[int]) -> tuple[str, ...]:
    """A pipeline stage's tensors: its own layers' and every tensor outside the layers
    (embeddings, final norm, head; vLLM's loaders skip those another stage owns)."""
    weight_map = json.loads(index_json).get("weight_map", {})
    own = set(layers)
    picked = []
    for name in sorted(weight_map):
        m = _LAYER.search(name)
        if m is None or int(m.group(1)) in own:
            picked.append(name)
    return tuple(picked)


def write_serve_files(client: Client, uri: str, directory: Path) -> list[str]:
    """Write the source's config and tokenizer files into ``directory`` (the daemon reads
    them; the worker needs no credentials). Returns the names written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SERVE_FILES:
        try:
            data = client.read_file(uri, name)
        except SourceNotFound:
            continue
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(directory / name)
        written.append(name)
    if "config.json" not in written:
        raise SourceNotFound(
            f"{uri} has no config.json; vLLM needs the model's config beside its weights"
        )
    return written
