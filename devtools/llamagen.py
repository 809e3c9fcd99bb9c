"""A tiny Llama for engine tests and benches: random bf16 weights in several safetensors
shards with an index, its config, and a small byte-level BPE tokenizer trained here.

Nothing is downloaded: the architecture is transformers' own ``LlamaForCausalLM`` and the
tokenizer is trained on a few sentences, so vLLM builds and runs it like any checkpoint.

    python -m tensorferry.devtools.llamagen DIR [--hidden 256] [--layers 4] [--shard-mib 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

import torch

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "tensorferry streams model weights into inference engines",
    "hello world, this is a tiny llama for tests and benchmarks",
    "one resident copy serves every rank on the host",
]


def write_tokenizer(directory: Path) -> int:
    """A byte-level BPE tokenizer (any text encodes); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(TEXT * 8, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return len(fast)


def write_llama(
    directory: Path, *, hidden: int = 256, layers: int = 4, intermediate: int = 0,
    shard_mib: int = 1, seed: int = 0,
) -> list[Path]:  # fmt: skip
    """Write the model into ``directory``; returns its safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory)
    heads = max(hidden // 64, 2)
    config = LlamaConfig(
        **_dtype("bfloat16"),
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = cast(Any, LlamaForCausalLM(config)).to(torch.bfloat16)
    # Random weights with a small spread: logits stay far apart, so greedy decoding is
    # the same under any kernel order (ties would make a comparison flaky).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory, max_shard_size=f"{shard_mib}MB", safe_serialization=True)
    return sorted(directory.glob("*.safetensors"))


def _dtype(name: str) -> dict[str, Any]:
    # transformers 5 calls it dtype; vLLM's pin and ours are both 5.x.
    return {"dtype": name}


def drop_tensor(directory: Path, name: str) -> None:
    """Remove one tensor from its shard (and the index): a checkpoint that lacks it."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = directory / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=0)
    parser.add_argument("--shard-mib", type=int, default=1)
    args = parser.parse_args()
    shards = write_llama(
        args.directory, hidden=args.hidden, layers=args.layers,
        intermediate=args.intermediate, shard_mib=args.shard_mib,
    )  # fmt: skip
    size = sum(p.stat().st_size for p in shards)
    print(f"{args.directory}: {len(shards)} shards, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
