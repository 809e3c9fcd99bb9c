"""Run vLLM engines one after another and report what each generated (tests, bench).

Runs in vLLM's own environment (``.venv-vllm``), started as a script:

    .venv-vllm/bin/python devtools/vllm_engine.py SPEC.json OUT.json

SPEC: ``{"prompts": [...], "max_tokens": 8, "engines": [{"label": ..., "model": DIR,
"load_format": "safetensors" | "tensorferry" | ..., "extra": {...}, "tp": 1, "pp": 1,
"env": {...}}]}``
(``env``: variables set while that engine runs, for engines in this process).
OUT gets, per engine: greedy token ids and cumulative logprobs per prompt, seconds from
``LLM(...)`` to the first generated token, and the error (type and text) if it failed.
One engine's failure does not stop the next; the process exits 0 once OUT is written.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from typing import Any


def run_engine(engine: dict[str, Any], prompts: list[str], max_tokens: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    result: dict[str, Any] = {"label": engine["label"]}
    saved = {k: os.environ.get(k) for k in engine.get("env", {})}
    os.environ.update(engine.get("env", {}))  # read when the loader runs (in this process)
    t0 = time.monotonic()
    llm = None
    try:
        tp, pp = int(engine.get("tp", 1)), int(engine.get("pp", 1))
        llm = LLM(
            model=engine["model"], load_format=engine["load_format"],
            model_loader_extra_config=engine.get("extra") or {}, tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            distributed_executor_backend="uni" if tp * pp == 1 else "mp", dtype="bfloat16",
            enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
            skip_tokenizer_init=False,
        )  # fmt: skip
        result["init_seconds"] = time.monotonic() - t0
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        result["first_token_seconds"] = time.monotonic() - t0
        params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=1)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
        result["logprobs"] = [o.outputs[0].cumulative_logprob for o in outputs]
    except Exception as exc:
        traceback.print_exc()
        result["error_type"] = type(exc).__name__
        result["error"] = str(exc)
    finally:
        del llm
        gc.collect()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"engine {engine['label']}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    results = [
        run_engine(engine, spec["prompts"], int(spec.get("max_tokens", 8)))
        for engine in spec["engines"]
    ]
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)


if __name__ == "__main__":
    main()
