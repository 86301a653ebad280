"""Grammar overhead per decode step: the embedded default model in the engine at batch 8, every request
constrained by the reply grammar the server builds for a chat request with two tools offered
(`tool_choice` auto: free text, then calls), against the same requests unconstrained.

Both arms decode the same prompts greedily for the same number of steps; a step is timed from the first
step after all prompts are prefilled (decode only). The grammar arm pays for the batched llguidance mask
(`engine.grammar.fill_masks`), the mask in the sampler and the matchers' token updates; compiling the
grammars happens before timing (a server compiles each request's grammar once, off the engine thread).
After one warm-up round, the arms take turns for `--repeats` rounds (bench/timing.py's rules): the median
mean step time of each is reported with its [min–max] spread, and the overhead is the median of the
per-round ratios.

    .venv/bin/python bench/grammar_overhead.py [--batch 8] [--steps 48] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import load_average, median, ratio_spread, spread  # noqa: E402

from longcat2 import chat  # noqa: E402
from longcat2.engine import Engine, SamplingParams  # noqa: E402
from longcat2.engine.grammar import Grammars, fill_masks  # noqa: E402
from longcat2.engine.sampling import RequestSampler  # noqa: E402
from longcat2.model.longcat import LongCatForCausalLM  # noqa: E402
from longcat2.serve.core import DEFAULT_MODEL_DIR  # noqa: E402
from longcat2.serve.reply_grammar import reply_grammar  # noqa: E402
from longcat2.tokenizer import load_tokenizer  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
                "required": ["query"],
            },
        },
    },
]
QUESTIONS = ["Write a story about the sea.", "Explain how a compiler works.", "Tell me about Paris."]


def mean_step_s(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    for p, sp in zip(prompts, params):
        engine.add_request(p, sp)
    while any(r.status.name != "DECODE" for r in engine.requests.values()):
        engine.step()  # prefill
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
        for sp in params:  # a finished reply (EOS is no stop here): constrain the next one from the start
            if sp.grammar is not None and (sp.grammar.matcher.is_stopped() or sp.grammar.matcher.is_error()):
                sp.grammar.matcher.reset()
                resets[0] += 1
                assert sp.grammar.active
    return sum(times[:-1]) / max(1, len(times) - 1)  # the last step only reports the end


resets = [0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    model = LongCatForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    grammars = Grammars(tok.backend.to_str(), model.config.vocab_size, tok.eos_id)
    grammar = reply_grammar(TOOLS, "auto")
    prompts = [
        tok.encode(chat.render([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], TOOLS))
        for i in range(args.batch)
    ]
    engine = Engine(model, max_batch_size=args.batch, detokenize=tok.decode, eos_token_id=None)
    times: dict[str, list[float]] = {"plain": [], "grammar": []}
    for rnd in range(args.repeats + 1):  # round 0 warms both arms up
        for arm in times:
            params = [
                SamplingParams(
                    max_new_tokens=args.steps, grammar=grammars.compile(grammar) if arm == "grammar" else None
                )
                for _ in prompts
            ]
            step_s = mean_step_s(engine, prompts, params)
            if rnd:
                times[arm].append(step_s)
    plain_ms = median(times["plain"]) * 1e3
    samplers = [
        RequestSampler(SamplingParams(grammar=grammars.compile(grammar)), p, tok.vocab_size) for p in prompts
    ]
    t = time.perf_counter()
    for _ in range(200):
        fill_masks(samplers)  # the batched mask alone, matchers at the reply's start
    mask_ms = (time.perf_counter() - t) / 200 * 1e3
    print(
        f"batch {args.batch}, {args.steps} decode steps, median of {args.repeats}, {args.threads} thread(s)"
    )
    print(f"  plain    {spread(times['plain'], 1e3)} ms/step")
    print(f"  grammar  {spread(times['grammar'], 1e3)} ms/step")
    print(f"  grammar / plain: {ratio_spread(times['grammar'], times['plain'], 3)}")
    print(f"  batched mask alone: {mask_ms:.2f} ms/step ({mask_ms / plain_ms * 100:.1f}% of a plain step)")
    print(f"  {load_average()}")
    print(f"  replies restarted after they ended: {resets[0]} (every step of every row was constrained)")


if __name__ == "__main__":
    main()
