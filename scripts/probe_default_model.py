#!/usr/bin/env python3
"""Probes of the embedded model's lookup tool calls (issue 18): where a held-out tool_call fails, measured.

    python scripts/probe_default_model.py breakdown DIR [--per-kind 40 --seed 778]  # tool_call by asked tool
    python scripts/probe_default_model.py decision DIR [--n 60 --space heldout]     # call vs refusal: AUC
    python scripts/probe_default_model.py selection DIR [--n 40 --space heldout]    # call forced: which tool
    python scripts/probe_default_model.py match-set OUT --n 9600 --seed 71 [--topic-first]  # the match drill
    python scripts/probe_default_model.py match DIR [--space wide5] [--topic-first] # the drill's accuracy
    python scripts/probe_default_model.py match-set OUT --n 9600 --seed 71 --space wide4 --listing description-first
    python scripts/probe_default_model.py reverse-set OUT --n 9600 --seed 81       # reverse record look-ups

Design choices:
- Each probe answers one question about a model directory, greedy or by teacher-forced log-probs, with the
  cases of `make_sft_data_v2.py` (its held-out spaces and seeds), so the numbers sit beside the evals.
- `breakdown`: the held-out tool_call cases split by the asked tool (get_weather, the calculator, a lookup):
  the eval's score mixes them, and v8's passes were all weather and calculator calls (lookups 0 of 19).
- `decision`: call / refusal contrast pairs (`contrast_pair`, the same question with and without the asked
  tool); the score is the log-probability of the whole refusal reply. The AUC says how well the model tells
  the two halves apart, the shares above 0.5 where greedy decoding would land.
- `selection`: the call forced (`<longcat_tool_call>` appended to the prompt), the offered tool whose name
  (and newline) has the highest summed log-probability. Chance is 1 / the number of offered tools.
- `match-set` / `match`: the smallest form of selection, "Tools: a_b, c_d. Which tool answers this? <lookup
  question>" → the tool's name, as SFT data and as a greedy exact-match eval. `--topic-first` writes every
  name topic first (`energy_use_read`), so that the answer continues the matched words instead of
  starting with the word before them. `--listing name-first | description-first` offers the tools as JSON
  lines, the name before or after its description (session 24: whether a description that names the topic
  before the name makes the choice a forward look-up).
- `reverse-set`: "Record: {...}. Which key has the value V?" → the key: the same backward look-up in a short
  record, the kind of item a copy warm-up could carry. Both item makers live in `make_sft_data_v2.py`
  (`match_item`, `reverse_item`), whose `--lookup-set` mixes them for recipe v10's look-up warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sft_data_v2 as v2  # noqa: E402


def _reply_logprobs(model, tok, messages: list, tools: list | None, reply: dict[str, Any]):
    """Per-token log-probs of `reply` after the rendered prompt (teacher-forced, one forward)."""
    import torch

    from longcat2 import chat as chat_template

    prefix = tok.encode(chat_template.render(messages, tools, True, False))
    ids = tok.encode(chat_template.render(messages + [reply], tools, False, False))
    if ids[: len(prefix)] != prefix:
        raise ValueError("the rendered reply does not extend the rendered prompt")
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0, :-1].float(), -1)
    return logp[len(prefix) - 1 :].gather(1, x[0, len(prefix) :, None])[:, 0]


def asked_kind(target: dict[str, Any]) -> str:
    names = {c["function"]["name"] for c in target["tool_calls"]}
    if names == {"get_weather"}:
        return "weather"
    if names == {"calculator"}:
        return "calculator"
    return "lookup and weather" if "get_weather" in names else "lookup"


def breakdown(model_dir: str, per_kind: int, seed: int) -> dict[str, Any]:
    tok, model = v2._load(model_dir)
    cases = [c for c in v2.eval_cases(per_kind, seed) if c[0] == "tool_call"]
    replies, _ = v2._generate(model, tok, [(c[1], c[2]) for c in cases], 96, False)
    out: dict[str, dict[str, int]] = {}
    for (kind, _, _, target, mention), got in zip(cases, replies):
        row = out.setdefault(asked_kind(target), {"cases": 0, "right": 0, "called": 0})
        row["cases"] += 1
        row["right"] += int(v2.score(kind, target, mention, got))
        row["called"] += int(bool(got.tool_calls))
    return out


def decision(model_dir: str, n: int, space: str, seed: int = 901) -> dict[str, Any]:
    tok, model = v2._load(model_dir)
    rng = random.Random(seed)
    refusal = {"role": "assistant", "content": v2.REFUSAL}
    offered, removed = [], []
    for _ in range(n):
        call, refuse = v2.contrast_pair(rng, v2.Space(space))
        msgs = call.record["messages"]
        head = msgs[: next(j for j, m in enumerate(msgs) if m["role"] == "assistant")]
        offered.append(float(_reply_logprobs(model, tok, head, call.record["tools"], refusal).sum()))
        removed.append(float(_reply_logprobs(model, tok, head, refuse.record["tools"], refusal).sum()))
    half = math.log(0.5)
    return {
        "pairs": n,
        "auc": sum((b > a) + 0.5 * (a == b) for a in offered for b in removed) / n / n,
        "tool_offered_refusal_over_half": sum(a > half for a in offered) / n,
        "tool_removed_refusal_over_half": sum(b > half for b in removed) / n,
    }


def selection(model_dir: str, n: int, space: str, seed: int = 901) -> dict[str, Any]:
    import torch

    from longcat2 import chat as chat_template

    tok, model = v2._load(model_dir)
    rng = random.Random(seed)
    right = chance = total = 0.0
    while total < n:
        case = v2.tool_use(rng, v2.Space(space))
        msgs, tools = case.record["messages"], case.record["tools"]
        k = next(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        asked = {c["function"]["name"] for c in msgs[k]["tool_calls"]}
        names = [t["function"]["name"] for t in tools if t["function"]["name"] != "calculator"]
        if len(asked) != 1 or asked & {"get_weather", "calculator"} or len(names) < 2:
            continue
        prefix = tok.encode(chat_template.render(msgs[:k], tools, True, False) + "<longcat_tool_call>")
        scores = {}
        for name in names:
            ids = tok.encode(name + "\n")
            x = torch.tensor([prefix + ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(x)[0, len(prefix) - 1 : -1].float(), -1)
            scores[name] = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
        right += max(scores, key=scores.__getitem__) in asked
        chance += 1 / len(names)
        total += 1
    return {"cases": n, "accuracy": right / total, "chance": chance / total}


def match(
    model_dir: str, space: str, topic_first: bool, n: int = 60, seed: int = 5, listing: str = "names"
) -> dict[str, Any]:
    tok, model = v2._load(model_dir)
    rng = random.Random(seed)
    items = [v2.match_item(rng, v2.Space(space), topic_first, listing) for _ in range(n)]
    replies, _ = v2._generate(model, tok, [(it[:1], None) for it in items], 24, False)
    right = sum(r.content.strip() == it[1]["content"] for r, it in zip(replies, items))
    return {"cases": n, "accuracy": right / n, "topic_first": topic_first, "listing": listing, "space": space}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "probe", choices=["breakdown", "decision", "selection", "match-set", "match", "reverse-set"]
    )
    ap.add_argument("path", help="model directory (match-set: the .jsonl to write)")
    ap.add_argument("--per-kind", type=int, default=40, help="breakdown: eval conversations per kind")
    ap.add_argument("--seed", type=int, default=None, help="breakdown: 778; match-set: required")
    ap.add_argument("--n", type=int, default=None, help="pairs / cases / conversations")
    ap.add_argument("--space", default=None, help="heldout (default) or a training space such as wide5")
    ap.add_argument("--topic-first", action="store_true", help="match: names written topic first")
    ap.add_argument(
        "--listing",
        choices=v2.MATCH_LISTINGS,
        default="names",
        help="match: the tools as a list of names, or as JSON lines with the name before / after its description",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args(argv)
    if args.probe in ("match-set", "reverse-set"):
        if args.seed is None or args.n is None:
            ap.error(f"{args.probe} needs --n and --seed")
        rng = random.Random(args.seed)
        space = v2.Space(args.space or "wide5")
        with open(args.path, "w", encoding="utf-8") as f:
            for _ in range(args.n):
                item = (
                    v2.match_item(rng, space, args.topic_first, args.listing)
                    if args.probe == "match-set"
                    else v2.reverse_item(rng, space)
                )
                f.write(json.dumps({"messages": item}) + "\n")
        print(f"wrote {args.n} {args.probe} conversations to {args.path}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    space = args.space or "heldout"
    if args.probe == "breakdown":
        result = breakdown(args.path, args.per_kind, 778 if args.seed is None else args.seed)
    elif args.probe == "decision":
        result = decision(args.path, args.n or 60, space)
    elif args.probe == "selection":
        result = selection(args.path, args.n or 40, space)
    else:
        result = match(args.path, args.space or "wide5", args.topic_first, args.n or 60, listing=args.listing)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
