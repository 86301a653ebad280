"""Shared fixtures: chat files (the prepared corpus `prepared` is in tests/conftest.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


def write_chats(path: Path, n: int = 40, seed: int = 0, tool_every: int = 0) -> Path:
    """Arithmetic chats; with `tool_every` k, every k-th one calls a tool and answers after its result."""
    rng = random.Random(seed)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "add two integers",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                },
            },
        }
    ]
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            msgs = [{"role": "user", "content": f"What is {a} plus {b}?"}]
            rec: dict = {"messages": msgs}
            if tool_every and i % tool_every == 0:
                rec["tools"] = tools
                call = {
                    "type": "function",
                    "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})},
                }
                msgs += [
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": str(a + b)},
                    {"role": "assistant", "content": f"It is {a + b}."},
                ]
            else:
                msgs.append({"role": "assistant", "content": f"{a} plus {b} is {a + b}."})
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="session")
def make_chats():
    return write_chats


@pytest.fixture(scope="session")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl")


@pytest.fixture(scope="session")
def tool_chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("chats") / "tool_chats.jsonl", n=12, tool_every=3)
