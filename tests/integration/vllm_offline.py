"""`<vLLM venv python> -m tests.integration.vllm_offline JOBS OUT`: vLLM's own offline greedy output (``LLM.generate``)
for the engine contract tests, with the engine arguments the worker's vLLM engine uses.

JOBS is a JSON file {"model": dir, "jobs": [{"key", "prompt_ids", "max_tokens"}]}; OUT gets {key: [token ids]},
the end-of-sequence token left out as the worker leaves it out.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    from services.settings import Settings
    from workers.engine.vllm_engine import engine_args

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    llm = LLM(**engine_args(Settings.from_env(), spec["model"], "cpu"))
    jobs = spec["jobs"]
    prompts = [{"prompt_token_ids": job["prompt_ids"]} for job in jobs]
    params = [SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, detokenize=False) for job in jobs]
    result: dict[str, list[int]] = {}
    for job, out in zip(jobs, llm.generate(prompts, params, use_tqdm=False), strict=True):
        completion = out.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        if completion.finish_reason == "stop" and completion.stop_reason is None and ids:
            ids.pop()
        result[job["key"]] = ids
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
