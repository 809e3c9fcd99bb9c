"""Small generated BERTs through the daemon into transformers: the mapping rules (tied
weights, checkpoint key prefixes) and the refusals (missing, mismatched, wrong dtype)."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorferry.client import InvalidArtifact
from tests._transformers_helpers import assert_zero_copy, offline  # noqa: F401 (offline: autouse)
from tests.conftest import Daemon

transformers = pytest.importorskip("transformers")

from tensorferry.integrations.transformers import from_pretrained  # noqa: E402


def tiny_config() -> Any:
    return transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip


def save_tiny(model_class: Any, directory: Path) -> Path:
    torch.manual_seed(0)
    model_class(tiny_config()).save_pretrained(directory)
    return directory


IDS = torch.tensor([[2, 17, 33, 5, 90, 3]])


def test_tied_head_and_a_checkpoint_without_the_base_prefix(
    daemon: Daemon, local_root: Path
) -> None:
    src = save_tiny(transformers.BertForMaskedLM, local_root / "mlm")
    reference = transformers.AutoModelForMaskedLM.from_pretrained(src).eval()
    want = reference(input_ids=IDS).logits
    # The same weights saved as a base model saves them: no "bert." prefix.
    from safetensors.torch import load_file, save_file

    stripped = local_root / "stripped"
    stripped.mkdir()
    (stripped / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(src / "model.safetensors")
    save_file({k.removeprefix("bert."): v for k, v in tensors.items()},
              stripped / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    with daemon.client() as client:
        for source in (src, stripped):
            model = from_pretrained(str(source), transformers.AutoModelForMaskedLM, client=client)
            embeddings = model.bert.embeddings.word_embeddings.weight
            assert model.cls.predictions.decoder.weight is embeddings
            assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
            assert_zero_copy(model)
            with torch.inference_mode():
                assert torch.equal(model(input_ids=IDS).logits, want)
            del model, embeddings
    gc.collect()


def test_a_head_checkpoint_into_the_base_model(daemon: Daemon, local_root: Path) -> None:
    src = save_tiny(transformers.BertForSequenceClassification, local_root / "cls")
    reference = transformers.AutoModel.from_pretrained(src).eval()
    with daemon.client() as client:
        model = from_pretrained(str(src), client=client)  # "bert." stripped, head ignored
        assert type(model) is type(reference)
        assert_zero_copy(model)
        with torch.inference_mode():
            got = model(input_ids=IDS).last_hidden_state
            assert torch.equal(got, reference(input_ids=IDS).last_hidden_state)
        del model
    gc.collect()


def test_refuses_missing_mismatched_and_wrong_dtype(daemon: Daemon, local_root: Path) -> None:
    mlm = save_tiny(transformers.BertForMaskedLM, local_root / "mlm")
    wide = save_tiny(transformers.BertModel, local_root / "wide")
    config = json.loads((wide / "config.json").read_text())
    config["intermediate_size"] = 48
    (wide / "config.json").write_text(json.dumps(config))
    with daemon.client() as client:
        # BertModel has a pooler; the masked-LM checkpoint has none: no random init.
        with pytest.raises(InvalidArtifact, match=r"lacks 2 tensor\(s\) of BertModel: "
                           r"pooler\.dense\.weight, pooler\.dense\.bias"):  # fmt: skip
            from_pretrained(str(mlm), client=client)
        with pytest.raises(InvalidArtifact, match=r"does not fit BertModel: encoder\.layer\.0\."
                           r"intermediate\.dense\.weight: checkpoint \(64, 32\) torch\.float32, "
                           r"model \(48, 32\) torch\.float32"):  # fmt: skip
            from_pretrained(str(wide), client=client)
        with pytest.raises(InvalidArtifact, match=r"torch\.float32, model .* torch\.float16"):
            from_pretrained(
                str(mlm), transformers.AutoModelForMaskedLM, client=client, dtype=torch.float16
            )
    gc.collect()
