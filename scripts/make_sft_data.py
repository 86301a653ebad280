#!/usr/bin/env python3
"""Synthetic chat + tool-call SFT data for the embedded default model (one `{"messages", "tools"}` per line).

    python scripts/make_sft_data.py --out sft.jsonl [--n 6000] [--seed 0] [--val-out val.jsonl --val-n 200]
    python scripts/make_sft_data.py --eval-model DIR --n 200 --seed 777     # held-out accuracy, JSON

Deterministic from the seed (same seed and Python standard library, same file, byte for byte). The mix (shares of --n):
- tool use (40 %): `get_weather(city, unit)`, `get_time(city)`, `calculator(expression)`,
  `convert_currency(amount, from, to)` in random subsets and orders. The user asks ("What is the weather in
  Paris?"), the assistant calls the right tool with the right arguments (`{"city": "Paris"}`), the tool
  result comes back as JSON, and the assistant answers from it. Some replies say a short sentence before
  the call; a few conversations call two tools in one turn; a few continue with a second question.
- chat with tools offered but not needed (10 %): greetings or facts answered without any call, so the model
  learns that tools are optional.
- plain chat (25 %): greetings, who-are-you, capitals, small arithmetic, lists, multi-turn follow-ups, some
  with a system prompt; a share in thinking mode (`reasoning_content`, rendered as a think block after a
  ` /think_on` user turn).
- code completion (25 %): a Python function from the standard library cut after its signature and first
  lines ("Complete this Python function: ..."), the assistant writes the rest.

The model that learns this is tiny; the point is that it reliably produces the chat format, tool calls
with the right argument names and values, and answers grounded in tool results, through the real server.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CITIES = {
    "Paris": ("France", "Europe/Paris"), "London": ("United Kingdom", "Europe/London"),
    "Berlin": ("Germany", "Europe/Berlin"), "Madrid": ("Spain", "Europe/Madrid"),
    "Rome": ("Italy", "Europe/Rome"), "Lisbon": ("Portugal", "Europe/Lisbon"),
    "Vienna": ("Austria", "Europe/Vienna"), "Prague": ("Czechia", "Europe/Prague"),
    "Warsaw": ("Poland", "Europe/Warsaw"), "Oslo": ("Norway", "Europe/Oslo"),
    "Stockholm": ("Sweden", "Europe/Stockholm"), "Helsinki": ("Finland", "Europe/Helsinki"),
    "Athens": ("Greece", "Europe/Athens"), "Dublin": ("Ireland", "Europe/Dublin"),
    "Amsterdam": ("Netherlands", "Europe/Amsterdam"), "Brussels": ("Belgium", "Europe/Brussels"),
    "Tokyo": ("Japan", "Asia/Tokyo"), "Beijing": ("China", "Asia/Shanghai"),
    "Shanghai": ("China", "Asia/Shanghai"), "Seoul": ("South Korea", "Asia/Seoul"),
    "Singapore": ("Singapore", "Asia/Singapore"), "Bangkok": ("Thailand", "Asia/Bangkok"),
    "Delhi": ("India", "Asia/Kolkata"), "Mumbai": ("India", "Asia/Kolkata"),
    "Dubai": ("United Arab Emirates", "Asia/Dubai"), "Istanbul": ("Turkey", "Europe/Istanbul"),
    "Cairo": ("Egypt", "Africa/Cairo"), "Nairobi": ("Kenya", "Africa/Nairobi"),
    "Lagos": ("Nigeria", "Africa/Lagos"), "New York": ("United States", "America/New_York"),
    "Chicago": ("United States", "America/Chicago"), "San Francisco": ("United States", "America/Los_Angeles"),
    "Toronto": ("Canada", "America/Toronto"), "Mexico City": ("Mexico", "America/Mexico_City"),
    "Sao Paulo": ("Brazil", "America/Sao_Paulo"), "Buenos Aires": ("Argentina", "America/Argentina/Buenos_Aires"),
    "Lima": ("Peru", "America/Lima"), "Sydney": ("Australia", "Australia/Sydney"),
    "Melbourne": ("Australia", "Australia/Melbourne"), "Auckland": ("New Zealand", "Pacific/Auckland"),
}  # fmt: skip
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Greece": "Athens", "Ireland": "Dublin", "Japan": "Tokyo", "China": "Beijing", "South Korea": "Seoul",
    "Thailand": "Bangkok", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Australia": "Canberra", "New Zealand": "Wellington", "United Kingdom": "London",
    "United States": "Washington, D.C.", "Turkey": "Ankara", "Netherlands": "Amsterdam",
}  # fmt: skip
CONDITIONS = ["sunny", "cloudy", "partly cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CNY", "CHF", "CAD", "AUD"]
RATES = {
    "USD": 1.0,
    "EUR": 0.92,
    "GBP": 0.79,
    "JPY": 151.0,
    "CNY": 7.2,
    "CHF": 0.88,
    "CAD": 1.36,
    "AUD": 1.52,
}

TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    "get_time": {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    },
    "calculator": {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}},
                "required": ["expression"],
            },
        },
    },
    "convert_currency": {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money between currencies.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "from": {"type": "string", "description": "ISO code, e.g. USD"},
                    "to": {"type": "string", "description": "ISO code, e.g. EUR"},
                },
                "required": ["amount", "from", "to"],
            },
        },
    },
}
SYSTEMS = [
    "You are a helpful assistant.",
    "You are LongCat, a helpful assistant. Answer briefly.",
    "You are a concise assistant. Use the tools when they help.",
    "You are a coding assistant.",
]
IDENTITY = "I am LongCat, a small language model trained with the longcat2 project. How can I help?"


def _call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


# ------------------------------------------------------------------------------------------- tool use


def _weather(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    city = rng.choice(list(CITIES))
    unit = rng.choice([None, None, None, "celsius", "fahrenheit"])
    q = rng.choice(
        [
            "What is the weather in {c}?", "What's the weather like in {c} today?", "How is the weather in {c}?",
            "Is it raining in {c}?", "Tell me the current weather in {c}.", "weather in {c}?",
            "Do I need an umbrella in {c} right now?", "How warm is it in {c}?",
        ]
    ).format(c=city)  # fmt: skip
    args: dict[str, Any] = {"city": city}
    if unit:
        q = q.rstrip("?.") + (" in Fahrenheit?" if unit == "fahrenheit" else " in Celsius?")
        args["unit"] = unit
    cond = rng.choice(CONDITIONS)
    temp_c = rng.randint(-10, 38)
    temp = round(temp_c * 9 / 5 + 32) if unit == "fahrenheit" else temp_c
    sym = "°F" if unit == "fahrenheit" else "°C"
    result = {"city": city, "temperature": temp, "unit": unit or "celsius", "condition": cond}
    answer = rng.choice(
        [
            f"It is {cond} in {city} with a temperature of {temp}{sym}.",
            f"The weather in {city} is {cond}, {temp}{sym}.",
            f"Right now {city} is {cond} and {temp}{sym}.",
        ]
    )
    if "umbrella" in q:
        wet = cond in ("rainy", "stormy")
        answer = f"{'Yes' if wet else 'No'}: it is {cond} in {city} ({temp}{sym})."
    return q, "get_weather", args, result, answer


def _time(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    city = rng.choice(list(CITIES))
    q = rng.choice(
        ["What time is it in {c}?", "What's the local time in {c}?", "Current time in {c}?"]
    ).format(c=city)
    hh, mm = rng.randint(0, 23), rng.randint(0, 59)
    t = f"{hh:02d}:{mm:02d}"
    result = {"city": city, "timezone": CITIES[city][1], "time": t}
    return q, "get_time", {"city": city}, result, f"It is {t} in {city}."


def _calc(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*", "*", "/"])
    if op == "/":
        a = a * b
    expr = f"{a} {op} {b}"
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    q = rng.choice(["What is {e}?", "Calculate {e}.", "Compute {e} please.", "How much is {e}?"]).format(
        e=expr
    )
    return q, "calculator", {"expression": expr}, {"result": value}, f"{expr} = {value}."


def _currency(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    src, dst = rng.sample(CURRENCIES, 2)
    amount = rng.choice([5, 10, 20, 50, 100, 250, 1000])
    value = round(amount / RATES[src] * RATES[dst], 2)
    q = rng.choice(["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?", "{a} {s} in {d}?"]).format(
        a=amount, s=src, d=dst
    )
    args = {"amount": amount, "from": src, "to": dst}
    return (
        q,
        "convert_currency",
        args,
        {"amount": value, "currency": dst},
        f"{amount} {src} is {value} {dst}.",
    )


TASKS = [_weather, _weather, _weather, _time, _calc, _currency]


def _toolset(rng: random.Random, needed: list[str]) -> list[dict[str, Any]]:
    names = set(needed) | set(rng.sample(list(TOOLS), rng.randint(0, 2)))
    order = sorted(names)
    rng.shuffle(order)
    return [TOOLS[n] for n in order]


def tool_conversation(rng: random.Random) -> dict[str, Any]:
    two = rng.random() < 0.12
    tasks = [rng.choice(TASKS)(rng) for _ in range(2 if two else 1)]
    if two and tasks[0][1] == tasks[1][1] == "calculator":
        tasks = tasks[:1]
        two = False
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    question = tasks[0][0] if not two else f"{tasks[0][0]} Also, {tasks[1][0][0].lower()}{tasks[1][0][1:]}"
    messages.append({"role": "user", "content": question})
    preface = rng.choice(["", "", "", "Let me check.", "I will look that up."])
    calls = [_call(t[1], t[2]) for t in tasks]
    messages.append({"role": "assistant", "content": preface, "tool_calls": calls})
    for t in tasks:
        messages.append({"role": "tool", "content": json.dumps(t[3], ensure_ascii=False)})
    messages.append({"role": "assistant", "content": " ".join(t[4] for t in tasks)})
    needed = [t[1] for t in tasks]
    if rng.random() < 0.15:  # a follow-up question in the same conversation
        q, name, args, result, answer = rng.choice(TASKS)(rng)
        needed.append(name)
        messages += [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [_call(name, args)]},
            {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
            {"role": "assistant", "content": answer},
        ]
    return {"messages": messages, "tools": _toolset(rng, needed)}


# ------------------------------------------------------------------------------------------ plain chat


def _facts(rng: random.Random) -> tuple[str, str, str | None]:
    """(question, answer, reasoning or None)."""
    kind = rng.randrange(7)
    if kind == 0:
        return (
            rng.choice(["Hi!", "Hello", "hello there", "Hey", "Good morning!"]),
            rng.choice(["Hello! How can I help you today?", "Hi! What can I do for you?"]),
            None,
        )
    if kind == 1:
        return rng.choice(["Who are you?", "What is your name?", "What are you?"]), IDENTITY, None
    if kind == 2:
        country = rng.choice(list(CAPITALS))
        q = rng.choice(
            ["What is the capital of {c}?", "Capital of {c}?", "Which city is the capital of {c}?"]
        )
        return q.format(c=country), f"The capital of {country} is {CAPITALS[country]}.", None
    if kind == 3:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        r = f"I need to add {a} and {b}. {a} + {b} = {a + b}."
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", r
    if kind == 4:
        n = rng.randint(3, 7)
        start = rng.randint(1, 20)
        nums = ", ".join(str(start + i) for i in range(n))
        return f"Count from {start} to {start + n - 1}.", nums + ".", None
    if kind == 5:
        city = rng.choice(list(CITIES))
        return f"Which country is {city} in?", f"{city} is in {CITIES[city][0]}.", None
    words = rng.sample(["apple", "river", "cloud", "stone", "tiger", "piano", "lemon", "rocket"], 3)
    return f"Repeat these words: {' '.join(words)}", " ".join(words), None


def chat_conversation(rng: random.Random, with_tools: bool = False) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(1 if rng.random() < 0.75 else 2):
        q, a, reasoning = _facts(rng)
        messages.append({"role": "user", "content": q})
        reply: dict[str, Any] = {"role": "assistant", "content": a}
        if reasoning and not with_tools:
            reply["reasoning_content"] = reasoning
        messages.append(reply)
    rec: dict[str, Any] = {"messages": messages}
    if with_tools:
        rec["tools"] = _toolset(rng, [])
    return rec


# ------------------------------------------------------------------------------------- code completion


def stdlib_modules(limit_files: int = 400) -> Iterator[tuple[str, ast.Module]]:
    """(source, syntax tree) of the standard library's first `limit_files` top-level modules by path; a file
    that cannot be read or parsed is skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py"))[:limit_files]:
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        yield src, tree


def stdlib_functions(limit_files: int = 400) -> list[str]:
    """Source of small top-level functions (4-24 lines, with a docstring) from the standard library."""
    out: list[str] = []
    for src, tree in stdlib_modules(limit_files):
        lines = src.splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.end_lineno and not node.decorator_list:
                n = node.end_lineno - node.lineno + 1
                if 4 <= n <= 24 and ast.get_docstring(node) and not node.name.startswith("_"):
                    text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                    if "\t" not in text and max(map(len, text.splitlines())) <= 100:
                        out.append(text)
    return out


def code_conversation(rng: random.Random, functions: list[str]) -> dict[str, Any]:
    src = rng.choice(functions)
    lines = src.splitlines()
    body_start = 1
    while body_start < len(lines) and not lines[body_start - 1].rstrip().endswith(":"):
        body_start += 1  # multi-line signatures
    cut = min(len(lines) - 1, body_start + rng.randint(0, 3))
    head, tail = "\n".join(lines[:cut]), "\n".join(lines[cut:])
    ask = rng.choice(
        [
            "Complete this Python function:\n```python\n{h}\n```",
            "Finish the code:\n```python\n{h}\n```",
            "Continue this Python code:\n```python\n{h}\n```",
        ]
    )
    return {
        "messages": [
            {"role": "user", "content": ask.format(h=head)},
            {"role": "assistant", "content": f"```python\n{tail}\n```"},
        ]
    }


# ---------------------------------------------------------------------------------------------- eval


def _prompts_for_eval(records: list[dict[str, Any]]) -> list[tuple[str, list, list | None, dict]]:
    """(kind, messages before the first assistant reply, tools, that reply) per held-out conversation."""
    out = []
    for rec in records:
        msgs = rec["messages"]
        i = next(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        target = msgs[i]
        if target.get("tool_calls"):
            kind = "tool_call"
        elif rec.get("tools"):
            kind = "no_call"
        elif msgs[i - 1]["content"].startswith(("Complete", "Finish", "Continue")):
            kind = "code"
        else:
            kind = "chat"
        out.append((kind, msgs[:i], rec.get("tools"), target))
        if kind == "tool_call":  # also the answer after the tool result
            j = next(k for k in range(i + 1, len(msgs)) if msgs[k]["role"] == "assistant")
            out.append(("tool_answer", msgs[:j], rec.get("tools"), msgs[j]))
    return out


def evaluate(
    model_dir: str, n: int, seed: int, max_new_tokens: int = 64, grammar: bool = False
) -> dict[str, Any]:
    """Greedy generations of a model on held-out conversations, parsed with the chat template's parser:
    tool_call = exact tool names and arguments; tool_answer = the reply states the tool result's values;
    no_call = no call when tools are offered but not needed; chat = exact reply; code = first line exact.
    `grammar`: constrain each reply with the server's reply grammar (tool_choice auto), as `serve` does."""
    import time

    from longcat2 import chat
    from longcat2.engine import Engine, SamplingParams
    from longcat2.model.longcat import LongCatForCausalLM
    from longcat2.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = LongCatForCausalLM.from_pretrained(model_dir)
    cases = _prompts_for_eval(generate(n, seed))
    prompts = [tok.encode(chat.render(m, t, True, False)) for _, m, t, _ in cases]
    engine = Engine(model, max_batch_size=32, eos_token_id=tok.eos_id)
    t0 = time.perf_counter()
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0) for _ in cases]
    if grammar:
        from longcat2.engine.grammar import Grammars
        from longcat2.serve.reply_grammar import reply_grammar

        grammars = Grammars(tok.backend.to_str(), model.config.vocab_size, tok.eos_id)
        for p, (_, _, tools, _) in zip(params, cases):
            p.grammar = grammars.compile(reply_grammar(tools, "auto", thinking=False))
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    scores: dict[str, list[int]] = {}
    examples: dict[str, dict[str, Any]] = {}
    for (kind, msgs, tools, target), ids in zip(cases, outs):
        got = chat.parse(tok.decode(ids), tools)
        if kind == "tool_call":
            want = [
                (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in target["tool_calls"]
            ]
            ok = [(c["name"], c["arguments"]) for c in got.tool_calls] == want
        elif kind == "tool_answer":
            result = json.loads(msgs[-1]["content"])
            values = [str(v) for k, v in result.items() if k in ("temperature", "time", "result", "amount")]
            ok = not got.tool_calls and all(v in got.content for v in values)
        elif kind == "no_call":
            ok = not got.tool_calls and got.content == target["content"]
        elif kind == "code":
            want_line = target["content"].split("\n")[1] if "\n" in target["content"] else target["content"]
            ok = got.content.split("\n")[1:2] == [want_line]
        else:
            ok = got.content == target["content"]
        scores.setdefault(kind, []).append(int(ok))
        examples.setdefault(kind, {"prompt": msgs[-1]["content"][:200], "reply": got.to_message()})
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    paris = chat.parse(
        tok.decode(engine.generate([tok.encode(chat.render(weather, [TOOLS["get_weather"]], True, False))],
                                   SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))[0]),
        [TOOLS["get_weather"]],
    )  # fmt: skip
    return {
        "model": str(model_dir),
        "held_out_seed": seed,
        "cases": len(cases),
        "accuracy": {k: round(sum(v) / len(v), 4) for k, v in sorted(scores.items())},
        "counts": {k: len(v) for k, v in sorted(scores.items())},
        "paris_weather": {"tool_calls": paris.tool_calls, "content": paris.content},
        "generated_tokens": sum(len(o) for o in outs),
        "generation_seconds": round(seconds, 2),
        "examples": examples,
    }


# ---------------------------------------------------------------------------------------------- main


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    functions = stdlib_functions()
    if not functions:
        raise SystemExit("error: found no standard-library functions to make code-completion examples from")
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.40:
            out.append(tool_conversation(rng))
        elif r < 0.50:
            out.append(chat_conversation(rng, with_tools=True))
        elif r < 0.75:
            out.append(chat_conversation(rng))
        else:
            out.append(code_conversation(rng, functions))
    return out


def write(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output .jsonl")
    ap.add_argument(
        "--eval-model", metavar="DIR", help="instead: evaluate a model on --n held-out conversations"
    )
    ap.add_argument("--grammar", action="store_true", help="with --eval-model: grammar-constrained replies")
    ap.add_argument("--n", type=int, default=6000, help="conversations (default 6000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--val-out", default=None, help="also write a validation .jsonl (another seed)")
    ap.add_argument("--val-n", type=int, default=200, help="validation conversations (default 200)")
    args = ap.parse_args(argv)
    if args.eval_model:
        result = evaluate(args.eval_model, args.n, args.seed, grammar=args.grammar)
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    if not args.out:
        ap.error("--out is required (or --eval-model DIR)")
    records = generate(args.n, args.seed)
    write(Path(args.out), records)
    kinds = {
        "tool": sum(1 for r in records if any(m.get("tool_calls") for m in r["messages"])),
        "code": sum(
            1 for r in records if r["messages"][0]["content"].startswith(("Complete", "Finish", "Continue"))
        ),
        "thinking": sum(1 for r in records if any(m.get("reasoning_content") for m in r["messages"])),
    }
    print(f"wrote {len(records)} conversations to {args.out} ({kinds})")
    if args.val_out:
        write(Path(args.val_out), generate(args.val_n, args.seed + 1_000_003))
        print(f"wrote {args.val_n} validation conversations to {args.val_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
