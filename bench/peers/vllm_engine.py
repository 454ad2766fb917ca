"""Runs under the vLLM peer venv: load a model once, then time LLM.generate for each JSON job read from stdin.

Standalone on purpose (no tokenrelay imports): it runs with the peer venv's Python, not the project's.
Job: {"prompts": [[token ids], ...], "max_tokens": 64}; answer: {"seconds": s, "tokens": n} on one line (the
benchmark reads the CPU time of this process and its children itself).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, max_seqs = sys.argv[1], int(sys.argv[2])
    llm = LLM(
        model=model,
        dtype="float32",
        max_num_seqs=max_seqs,
        enable_prefix_caching=False,
        max_model_len=int(sys.argv[3]) if len(sys.argv) > 3 else None,
        seed=0,
        # On CPU this fraction is of RAM; the box is shared, so reserve little (the KV cache needs ~1 GiB here).
        gpu_memory_utilization=float(sys.argv[4]) if len(sys.argv) > 4 else 0.15,
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
