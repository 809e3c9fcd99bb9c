"""vLLM's entry point (group ``vllm.general_plugins``): registers ``--load-format
tensorferry``. vLLM calls it in every process it starts, maybe more than once."""

from __future__ import annotations

LOAD_FORMAT = "tensorferry"
_registered: list[bool] = []


def register() -> None:
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from tensorferry.integrations.vllm import TensorferryModelLoader

    register_model_loader(LOAD_FORMAT)(TensorferryModelLoader)
    _registered.append(True)
