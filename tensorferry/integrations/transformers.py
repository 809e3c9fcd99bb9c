"""Hugging Face transformers models built on the daemon's tensors, without copying them.

    from tensorferry.integrations.transformers import from_pretrained, load_tokenizer

    model = from_pretrained("s3://models/all-MiniLM-L6-v2/")  # eval mode, zero copy
    tokenizer = load_tokenizer("s3://models/all-MiniLM-L6-v2/")

The daemon serves the weights (one shared arena for every worker on the host) and the
source's small files (config.json, tokenizer files): nothing is downloaded from a hub.
The model is built with its parameters on the meta device; every parameter then becomes an
``nn.Parameter`` over the daemon's view (``requires_grad=False``), persistent buffers in
the checkpoint become the views themselves, and buffers the module computes itself
(``position_ids``, rotary ``inv_freq``, ...) keep the values its own ``__init__`` gave them.

The lease on the model lasts as long as the model: its parameters are views of the arena,
and ``model._tensorferry`` keeps the ``LoadedModel``.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorferry.client import Client
from tensorferry.errors import InvalidRequest, SourceNotFound
from tensorferry.integrations._hf_attach import attach

__all__ = ["TOKENIZER_FILES", "from_pretrained", "load_tokenizer"]

CONFIG_FILE = "config.json"
# What AutoTokenizer may read from a model folder (those a source lacks are skipped).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", CONFIG_FILE,
)  # fmt: skip


def from_pretrained(
    uri: str,
    model_class: Any = None,
    device: str = "cpu",
    client: Client | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load ``uri`` through the daemon and return a transformers model on its tensors.

    ``model_class`` defaults to ``transformers.AutoModel`` (any Auto class or model class
    works); ``kwargs`` go to its ``from_config`` (e.g. ``attn_implementation="eager"``).
    ``device`` is passed to the daemon. ``client`` defaults to a ``Client()`` on the
    default socket. The model is in eval mode with ``requires_grad=False`` parameters.

    Raises ``InvalidArtifact`` when the checkpoint lacks a parameter of the model or holds
    it with another shape or dtype: nothing is ever initialised at random.
    """
    own_client = client is None
    client = Client() if client is None else client
    try:
        loaded = client.load(uri, device=device)
        try:
            if CONFIG_FILE not in loaded.files:
                raise SourceNotFound(
                    f"{uri} has no {CONFIG_FILE} (files: {', '.join(loaded.files) or 'none'}); "
                    "a transformers model needs its config beside the weights"
                )
            with tempfile.TemporaryDirectory(prefix="tensorferry-hf-") as tmp:
                _fetch(client, uri, [CONFIG_FILE], Path(tmp))
                model = build_model(loaded.tensors, tmp, model_class, **kwargs)
        except BaseException as exc:
            # End the lease now, not whenever the traceback's frames (which hold the
            # half-built model's views) are collected.
            traceback.clear_frames(exc.__traceback__)
            loaded.close()
            raise
    finally:
        if own_client:
            client.close()  # the model's lease keeps its own reference to the channel
    # Not through nn.Module.__setattr__ (which types its values as tensors or modules).
    object.__setattr__(model, "_tensorferry", loaded)
    return model


def load_tokenizer(
    uri: str, client: Client | None = None, *, files: Sequence[str] | None = None, **kwargs: Any
) -> Any:
    """``AutoTokenizer.from_pretrained`` on the tokenizer files the daemon serves for ``uri``.

    ``files`` (e.g. ``model._tensorferry.files``) lists the source's files; without it the
    usual tokenizer file names are tried.
    """
    from transformers import AutoTokenizer

    own_client = client is None
    client = Client() if client is None else client
    try:
        names = [n for n in TOKENIZER_FILES if files is None or n in files]
        with tempfile.TemporaryDirectory(prefix="tensorferry-hf-") as tmp:
            if not _fetch(client, uri, names, Path(tmp), missing_ok=True):
                raise SourceNotFound(f"{uri} has none of the tokenizer files {TOKENIZER_FILES}")
            return AutoTokenizer.from_pretrained(tmp, **kwargs)
    finally:
        if own_client:
            client.close()


def _fetch(
    client: Client, uri: str, names: Sequence[str], into: Path, missing_ok: bool = False
) -> list[str]:
    got = []
    for name in names:
        if "/" in name or name.startswith("."):
            raise InvalidRequest(f"refusing to write the source file {name!r} to a local folder")
        try:
            data = client.read_file(uri, name)
        except SourceNotFound:
            if missing_ok:
                continue
            raise
        (into / name).write_bytes(data)
        got.append(name)
    return got


def build_model(
    tensors: Mapping[str, torch.Tensor], config_dir: str, model_class: Any = None, **kwargs: Any
) -> nn.Module:
    """Build the model of ``config_dir``/config.json on ``tensors`` without copying them."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    cls: Any = model_class if model_class is not None else transformers.AutoModel
    dtype = _checkpoint_float_dtype(tensors)
    if dtype is not None and "dtype" not in kwargs and "torch_dtype" not in kwargs:
        # Build in the checkpoint's dtype (transformers 4 builds in torch's default).
        kwargs[_dtype_kwarg(transformers.__version__)] = dtype
    with _parameters_on_meta():
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, **kwargs)
        else:
            model = cls._from_config(config, **kwargs)
    if not isinstance(model, nn.Module):
        raise InvalidRequest(f"{cls!r} built a {type(model).__name__}, not a torch module")
    attach(model, tensors, prefix=getattr(model, "base_model_prefix", "") or "")
    model.eval()
    return model


def _checkpoint_float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's bytes."""
    sizes: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.dtype.is_floating_point and t.dtype.itemsize >= 2:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    return max(sizes, key=lambda d: sizes[d]) if sizes else None


def _dtype_kwarg(version: str) -> str:
    major = version.split(".", 1)[0]
    return "dtype" if major.isdigit() and int(major) >= 5 else "torch_dtype"


_meta_lock = threading.Lock()
_meta_local = threading.local()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built in this thread get their parameters on the meta device; buffers stay
    real, so the values a module computes for them (positions, rotary frequencies) exist.

    Like accelerate's ``init_empty_weights(include_buffers=False)``: a parameter's first
    ``torch.empty`` is never touched, and it moves to meta as it is registered, before the
    module initialises it.
    """
    with _meta_lock:
        original = nn.Module.register_parameter

        def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
            original(self, name, param)
            if param is not None and getattr(_meta_local, "active", False):
                p = self._parameters[name]
                assert p is not None
                if not p.is_meta:
                    self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        _meta_local.active = True
        try:
            yield
        finally:
            _meta_local.active = False
            nn.Module.register_parameter = original  # type: ignore[method-assign]
