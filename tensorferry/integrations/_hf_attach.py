"""Making a checkpoint's tensors the parameters and buffers of a built model, zero copy.

Split from ``transformers.py`` (which re-exports ``attach``) to keep each module small.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from tensorferry.errors import InvalidArtifact

__all__ = ["attach"]

# The integration's logger, so that filters users set on it still apply after the split.
log = logging.getLogger("tensorferry.integrations.transformers")


def attach(model: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Make ``tensors`` (checkpoint name -> tensor) the parameters and buffers of ``model``.

    Parameters that share one object (tied weights) stay shared. Checkpoint names may lack
    or carry ``prefix`` (a base model's checkpoint in a model with a head, or the reverse).
    Non-persistent buffers are left as the module computed them.
    """

    used: set[str] = set()

    def lookup(name: str) -> str | None:
        for candidate in _candidates(name, prefix):
            if candidate in tensors:
                used.add(candidate)
                return candidate
        return None

    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    groups: dict[int, list[str]] = {}
    originals: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        originals[id(param)] = param
    missing: list[str] = []
    wrong: list[str] = []
    for key, names in groups.items():
        found = [(n, k) for n in names if (k := lookup(n)) is not None]
        if not found:
            missing.append(" = ".join(names))
            continue
        source = tensors[found[0][1]]
        original = originals[key]
        if source.shape != original.shape or source.dtype != original.dtype:
            wrong.append(
                f"{found[0][1]}: checkpoint {tuple(source.shape)} {source.dtype}, model "
                f"{tuple(original.shape)} {original.dtype}"
            )
            continue
        for _, other in found[1:]:
            if not torch.equal(tensors[other], source):
                wrong.append(
                    f"{found[0][1]} and {other} are tied in the model but differ in the "
                    "checkpoint (set tie_word_embeddings=False in the config?)"
                )
        param = nn.Parameter(source, requires_grad=False)
        for name in names:
            module, leaf = _owner(model, name)
            module._parameters[leaf] = param
    _refuse(model, missing, wrong, tensors)

    for name, buffer in list(model.named_buffers(remove_duplicate=False)):
        module, leaf = _owner(model, name)
        persistent = leaf not in module._non_persistent_buffers_set
        found_key = lookup(name) if persistent else None
        if found_key is None:
            if buffer.is_meta:
                missing.append(name)
            elif buffer.device != device:
                module._buffers[leaf] = buffer.to(device)
            continue
        source = tensors[found_key]
        if source.shape != buffer.shape or source.dtype != buffer.dtype:
            wrong.append(
                f"{found_key}: checkpoint {tuple(source.shape)} {source.dtype}, model buffer "
                f"{tuple(buffer.shape)} {buffer.dtype}"
            )
            continue
        module._buffers[leaf] = source
    _refuse(model, missing, wrong, tensors)
    if unused := sorted(set(tensors) - used):
        # A head the model has no use for, or buffers it computes itself (position_ids).
        log.info("%s does not use %d checkpoint tensor(s): %s", type(model).__name__,
                 len(unused), ", ".join(unused[:10]))  # fmt: skip


def _refuse(
    model: nn.Module, missing: list[str], wrong: list[str], tensors: Mapping[str, torch.Tensor]
) -> None:
    name = type(model).__name__
    if missing:
        sample = ", ".join(sorted(tensors)[:5])
        raise InvalidArtifact(
            f"the checkpoint lacks {len(missing)} tensor(s) of {name}: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (checkpoint "
            f"names look like: {sample}); load it with the model class it was saved from"
        )
    if wrong:
        raise InvalidArtifact(
            f"the checkpoint does not fit {name}: {'; '.join(wrong[:10])}"
            f"{' ...' if len(wrong) > 10 else ''}"
        )


def _candidates(name: str, prefix: str) -> list[str]:
    if not prefix:
        return [name]
    if name.startswith(prefix + "."):
        return [name, name[len(prefix) + 1 :]]
    return [name, f"{prefix}.{name}"]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf
