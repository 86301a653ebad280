"""scripts/make_sft_data_v2.py (the default model's v2 SFT data and held-out evals): deterministic, and the
held-out eval entities (names, numbers) never occur in training data; calls only name offered tools."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import make_sft_data_v2 as v2  # noqa: E402


@pytest.fixture(scope="module")
def train_records() -> list[dict]:
    return [c.record for c in v2.generate(600, 0, long_share=0.05, max_tokens=1536)]


def _tool_values(messages: list[dict]) -> list:
    """Every scalar value of every tool result of a conversation (calculator results left out)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            result = json.loads(m["content"])
            out += [v for k, v in result.items() if k != "result"]
    return out


def _held_out_values(cases: list) -> set[str]:
    """The numeric tool-result values of the held-out tool_answer cases, JSON-encoded."""
    return {
        json.dumps(v)
        for kind, msgs, _, _, _ in cases
        if kind == "tool_answer"
        for v in _tool_values(msgs)
        if isinstance(v, int | float)
    }


def test_same_seed_same_data():
    a = [json.dumps(c.record, sort_keys=True) for c in v2.generate(80, 3)]
    b = [json.dumps(c.record, sort_keys=True) for c in v2.generate(80, 3)]
    assert a == b
    assert a != [json.dumps(c.record, sort_keys=True) for c in v2.generate(80, 4)]


def test_held_out_entities_and_values_never_in_training(train_records):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in train_records)
    train_values = {json.dumps(v) for r in train_records for v in _tool_values(r["messages"])}
    cases = v2.eval_cases(10, 777)
    asked = [m[0] for kind, _, _, _, m in cases if kind == "tool_call" and len(m) > 1]
    assert len(asked) >= 5
    for name in asked:
        if name not in v2.REAL_CITIES:
            assert not re.search(rf"\b{re.escape(name)}\b", text), name
    eval_values = _held_out_values(cases)
    assert eval_values and not (eval_values & train_values)


def test_calls_name_offered_tools_and_refusals_make_none(train_records):
    kinds = set()
    for rec in train_records:
        offered = {t["function"]["name"] for t in rec.get("tools") or []}
        for m in rec["messages"]:
            for call in m.get("tool_calls") or []:
                assert call["function"]["name"] in offered
        last = rec["messages"][-1]
        if last["content"] == v2.REFUSAL:
            kinds.add("refusal")
            assert not any(m.get("tool_calls") for m in rec["messages"][-2:])
        if sum(1 for m in rec["messages"] if m["role"] == "tool") >= 2:
            kinds.add("parallel or multi-turn")
    assert kinds == {"refusal", "parallel or multi-turn"}


def test_copy_set_answers_are_copied_from_the_request():
    """The copy warm-up set: every answer's content (names, numbers, codes) is in the user's message, so it
    can only be learned by copying; no held-out eval name occurs in it."""
    cases = v2.copy_set(400, 0)
    for c in cases:
        question, answer = (m["content"] for m in c.record["messages"])
        copied = answer.removesuffix(".").split(" is ", 1)[-1]
        assert copied and copied in question, (question, answer)
    text = "\n".join(json.dumps(c.record) for c in cases)
    asked = [m[0] for kind, _, _, _, m in v2.eval_cases(10, 777) if kind == "tool_call" and m]
    assert asked and not any(
        re.search(rf"\b{re.escape(n)}\b", text) for n in asked if n not in v2.REAL_CITIES
    )


def test_chat_scoring_accepts_either_greeting_reply():
    """A greeting's training answer is one of two replies drawn at random, so the eval takes either; other chat
    answers are exact, and a call is never a chat answer."""
    from longcat2.chat import ParsedOutput

    greeting = {"role": "assistant", "content": v2.GREETING_REPLIES[0]}
    for reply in v2.GREETING_REPLIES:
        assert v2.score("chat", greeting, None, ParsedOutput(content=reply))
    assert not v2.score("chat", greeting, None, ParsedOutput(content="Hello."))
    call = {"id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}
    assert not v2.score(
        "chat", greeting, None, ParsedOutput(content=v2.GREETING_REPLIES[0], tool_calls=[call])
    )
    count = {"role": "assistant", "content": "3, 4, 5."}
    assert v2.score("no_call", count, None, ParsedOutput(content="3, 4, 5."))
    assert not v2.score("no_call", count, None, ParsedOutput(content=v2.GREETING_REPLIES[0]))


def test_open_space_names_are_random_letters_and_never_held_out_names():
    """The open space (random-letter names, the training tables otherwise) is training data too: its names
    never split into held-out syllables, no held-out eval name or value occurs in its mix or copy set, and its
    names are not training-syllable names either (the point of it: copying any letters)."""
    rng = random.Random(5)
    words = [v2.OPEN.word(rng) for _ in range(2000)]
    assert not any(v2._segments_into(w, v2._HELD_SYL) for w in words)
    train_syl = frozenset(s for s in v2._SYLLABLES if s not in v2._HELD_SYL)
    # few are syllable names (1.5 %)
    assert sum(v2._segments_into(w, train_syl) for w in words) < len(words) // 20
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 9 for w in words)
    records = [c.record for c in v2.generate(400, 0, long_share=0, space=v2.OPEN)]
    records += [c.record for c in v2.copy_set(400, 0, space=v2.OPEN)]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    cases = v2.eval_cases(10, 777)
    asked = [m[0] for kind, _, _, _, m in cases if kind == "tool_call" and m]
    assert asked and not any(re.search(rf"\b{re.escape(n)}\b", text) for n in asked)
    open_values = {json.dumps(v) for r in records for v in _tool_values(r["messages"])}
    eval_values = _held_out_values(cases)
    assert eval_values and not (eval_values & open_values)
    assert any(c.kind == "tool_call" for c in v2.generate(50, 1, long_share=0, space=v2.OPEN))


def test_piece_names_are_word_pieces_and_never_held_out_names():
    """open2 / wide4 (recipe v6): half the names join pieces of lexicon words, so copying covers the
    tokenizer's longer, word-like tokens; none splits into held-out syllables, no eval name occurs."""
    lexicon = v2.stdlib_lexicon()
    pieces = {w[i : i + 4] for w in lexicon for i in range(len(w) - 3)}  # every 4-letter piece of a word

    def share_with_piece(space: v2.Space) -> float:
        rng = random.Random(5)
        words = [space.word(rng) for _ in range(2000)]
        assert all(w.isalpha() and w.islower() for w in words)
        assert not any(v2._segments_into(w, v2._HELD_SYL) for w in words)
        return sum(any(w[i : i + 4] in pieces for i in range(len(w) - 3)) for w in words) / len(words)

    assert share_with_piece(v2.Space("open2")) > share_with_piece(v2.OPEN) + 0.25
    records = [c.record for c in v2.copy_set(400, 0, space=v2.Space("open2"))]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    asked = [m[0] for kind, _, _, _, m in v2.eval_cases(10, 777) if kind == "tool_call" and m]
    assert asked and not any(re.search(rf"\b{re.escape(n)}\b", text) for n in asked)


@pytest.mark.parametrize("split", ["wide", "wide2", "wide3", "wide4", "wide5"])
def test_wide_space_draws_tools_from_the_lexicon_and_never_a_held_out_word(split):
    """The wide spaces (recipe v4): topics, verbs, argument names, units and conditions are words of the
    standard library's lexicon, none of them a word of a held-out table; tool names are not the tables'.
    wide2 also offers the README's weather schema verbatim and snake_case argument names; wide3 the schema
    with one-word argument names."""
    lexicon = v2.stdlib_lexicon()
    assert len(lexicon) > 1000 and lexicon == sorted(set(lexicon))
    held = {w for t in v2._HELD_TABLES for e in t["heldout"] for w in e.lower().split()}
    assert not held & set(lexicon) and not any(v2._segments_into(w, v2._HELD_SYL) for w in lexicon)
    space = v2.Space(split)
    records = [c.record for c in v2.generate(300, 0, long_share=0, space=space)]
    records += [c.record for c in v2.copy_set(200, 0, space=space)]
    readme_schema = [t for r in records for t in r.get("tools", []) if t == v2.TOOLS["get_weather"]]
    args = [a for r in records for t in r.get("tools", []) for a in t["function"]["parameters"]["properties"]]
    compound = sum("_" in a for a in args) / len(args)
    expect = {"wide": (False, False), "wide2": (True, True)}.get(split, (True, False))  # wide3 and later
    assert (bool(readme_schema), compound > 0.25) == expect
    tools = [t["function"] for r in records for t in r.get("tools", [])]
    names = {t["name"] for t in tools} - {"calculator", "get_weather"}
    table_topics = {t.replace(" ", "_") for t in v2._TOPICS["train"]}
    assert len(names) > 200 and sum(n.split("_", 1)[1] in table_topics for n in names) < len(names) // 10
    words = set()
    for r in records:
        for m in r["messages"]:
            if m["role"] == "tool":
                for k, v in json.loads(m["content"]).items():
                    words |= set(k.split("_")) | (set(v.lower().split()) if isinstance(v, str) else set())
        words |= {w for t in r.get("tools", []) for w in re.findall(r"[a-z]+", json.dumps(t).lower())}
    assert not held & words
    cases = v2.eval_cases(10, 777)
    asked = [m[0] for kind, _, _, _, m in cases if kind == "tool_call" and m]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    assert asked and not any(re.search(rf"\b{re.escape(n)}\b", text) for n in asked)


def _contrast_pairs(cases):
    """Adjacent (call, refusal) cases with the same conversation head: `contrast_pair`'s output."""
    return [
        (a, b)
        for a, b in zip(cases, cases[1:])
        if a.kind == "tool_call"
        and b.kind == "refusal"
        and a.record["messages"][:-3] == b.record["messages"][:-1]
    ]


@pytest.mark.parametrize("split", ["wide3", "wide4", "wide5"])
def test_contrast_pairs_differ_only_in_the_offered_tool(split):
    """wide3's, wide4's and wide5's pairs: the same conversation head; the call's tools are the refusal's
    plus the called one."""
    cases = v2.generate(400, 3, long_share=0, space=v2.Space(split))
    assert len(cases) == 400
    pairs = _contrast_pairs(cases)
    assert len(pairs) >= 20
    for call, refuse in pairs:
        called = call.record["messages"][-3]["tool_calls"][0]["function"]["name"]
        call_tools = {t["function"]["name"] for t in call.record["tools"]}
        refuse_tools = {t["function"]["name"] for t in refuse.record["tools"]}
        assert call_tools - refuse_tools == {called} and refuse_tools < call_tools
        assert refuse.record["messages"][-1]["content"] == v2.REFUSAL


def test_wide5_varies_schema_surfaces_and_calls_only_offered_properties():
    """wide5 (recipe v8): get_weather offered with and without `unit`, with and without descriptions (the
    README's curl schema among them), other tools without a description or with an extra optional property;
    every call uses only the called tool's properties, its required one always; a third of the draws are
    contrast pairs, some with get_weather as the asked tool and some with a near-miss distractor."""
    space = v2.Space("wide5")
    cases = v2.generate(600, 5, long_share=0, space=space)
    tools = [t["function"] for c in cases for t in c.record.get("tools", [])]
    weather = [t for t in tools if t["name"] == "get_weather"]
    curl = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]}}  # fmt: skip
    assert any("unit" in t["parameters"]["properties"] for t in weather)
    assert any("unit" not in t["parameters"]["properties"] and "description" in t for t in weather)
    assert curl in weather
    others = [t for t in tools if t["name"] not in ("get_weather", "calculator")]
    assert 0.2 < sum("description" not in t for t in others) / len(others) < 0.45
    assert 0.15 < sum(len(t["parameters"]["properties"]) > 1 for t in others) / len(others) < 0.45
    for c in cases:
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in c.record.get("tools", [])}
        for m in c.record["messages"]:
            for call in m.get("tool_calls") or []:
                params = offered[call["function"]["name"]]
                args = json.loads(call["function"]["arguments"])
                assert set(params["required"]) <= set(args) <= set(params["properties"])
    heads = _contrast_pairs(cases)
    assert len(heads) > 0.2 * len(cases) / 2
    assert any(
        a.record["messages"][-3]["tool_calls"][0]["function"]["name"] == "get_weather" for a, _ in heads
    )
    near = 0
    for a, b in heads:
        topic = a.record["messages"][-3]["tool_calls"][0]["function"]["name"].split("_", 1)[1].split("_")
        others_topics = [t["function"]["name"].split("_", 1)[1].split("_") for t in b.record["tools"]]
        near += len(topic) == 2 and any(len(o) == 2 and len(set(o) & set(topic)) == 1 for o in others_topics)
    assert near >= 5


def test_drill_set_answers_are_right_and_never_call():
    """The drill set (recipe v6): small sums, spelling, counting and repeating, each answered exactly as
    the chat evals score it, never with a tool call (tools offered in about a third), no held-out name."""
    cases = v2.drill_set(600, 4, space=v2.Space("wide4"))
    kinds = {"sum": 0, "spell": 0, "count": 0, "repeat": 0}
    for c in cases:
        (user, reply), tools = c.record["messages"], c.record.get("tools", [])
        assert c.kind == "drill" and "tool_calls" not in reply
        q, a = user["content"], reply["content"]
        if m := re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)\.", a):
            x, op, y, value = int(m[1]), m[2], int(m[3]), int(m[4])
            assert value == {"+": x + y, "-": x - y, "*": x * y}[op] and str(x) in q and str(y) in q
            kinds["sum"] += 1
        elif q.startswith("Spell"):
            name = q.removeprefix("Spell the name ").removeprefix("Spell ").removesuffix(".")
            assert a == " ".join(name.replace(" ", "")) + "."
            kinds["spell"] += 1
        elif q.startswith("Count"):
            lo, hi = map(int, re.findall(r"\d+", q))
            assert a == ", ".join(map(str, range(lo, hi + 1))) + "."
            kinds["count"] += 1
        else:
            assert q == f"Repeat these words: {a}"
            kinds["repeat"] += 1
        kinds.setdefault("tools", 0)
        kinds["tools"] += bool(tools)
    assert (
        0.3 < kinds["sum"] / 600 < 0.5
        and 0.2 < kinds["spell"] / 600 < 0.4
        and kinds["count"]
        and kinds["repeat"]
    )
    assert 0.2 < kinds["tools"] / 600 < 0.45
    text = "\n".join(json.dumps(c.record, ensure_ascii=False) for c in cases)
    asked = [m[0] for kind, _, _, _, m in v2.eval_cases(10, 777) if kind == "tool_call" and m]
    assert not any(re.search(rf"\b{re.escape(n)}\b", text) for n in asked)


def test_decide_set_pairs_end_at_the_decision():
    """The decision drill (recipe v9): each conversation ends at its first reply; a call names an offered tool
    with only its properties and never after an "I ..." preface; a refusal follows the same conversation head
    without that tool; about 5 calls to 3 refusals."""
    space = v2.Space("wide5")
    cases = v2.decide_set(600, 8, space=space)
    assert len(cases) == 600 and cases == v2.decide_set(600, 8, space=space)
    calls = [c for c in cases if c.kind == "tool_call"]
    assert 0.55 < len(calls) / len(cases) < 0.7
    for c in cases:
        *head, reply = c.record["messages"]
        assert reply["role"] == "assistant" and all(m["role"] != "assistant" for m in head)
        if c.kind == "refusal":
            assert reply == {"role": "assistant", "content": v2.REFUSAL}
            continue
        (call,) = reply["tool_calls"]
        assert not reply["content"].startswith("I")
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in c.record["tools"]}
        params = offered[call["function"]["name"]]
        assert (
            set(params["required"])
            <= set(json.loads(call["function"]["arguments"]))
            <= set(params["properties"])
        )
    pairs = 0
    for a, b in zip(cases, cases[1:]):
        if (
            a.kind == "tool_call"
            and b.kind == "refusal"
            and a.record["messages"][:-1] == b.record["messages"][:-1]
        ):
            pairs += 1
            called = a.record["messages"][-1]["tool_calls"][0]["function"]["name"]
            call_tools = {t["function"]["name"] for t in a.record["tools"]}
            refuse_tools = {t["function"]["name"] for t in b.record.get("tools", [])}
            assert called not in refuse_tools and refuse_tools - {"calculator"} <= call_tools
    assert pairs > 0.4 * len(calls)


def test_match_items_answer_with_the_listed_name_of_the_asked_topic():
    for topic_first in (False, True):
        rng = random.Random(3)
        for _ in range(200):
            user, reply = v2.match_item(rng, v2.Space("wide5"), topic_first)
            listed = (
                user["content"].removeprefix("Tools: ").split(". Which tool answers this? ")[0].split(", ")
            )
            question = user["content"].split(". Which tool answers this? ")[1]
            assert reply["content"] in listed and len(set(listed)) == len(listed) >= 2
            name = reply["content"]
            verb_end = name.rfind("_") if topic_first else name.find("_")
            topic = name[:verb_end] if topic_first else name[verb_end + 1 :]
            assert topic.replace("_", " ").lower() in question.lower()


def test_match_items_list_tools_as_json_lines_in_the_asked_order():
    """`listing`: the same draws as the name list (same tools, question and answer), offered as one JSON object
    per line with the name before or after its description; the asked tool's description names its topic."""
    for listing, first in (("name-first", "name"), ("description-first", "description")):
        plain_rng, json_rng = random.Random(5), random.Random(5)
        for _ in range(100):
            plain_user, plain_reply = v2.match_item(plain_rng, v2.Space("wide4"), False)
            user, reply = v2.match_item(json_rng, v2.Space("wide4"), False, listing)
            assert reply == plain_reply
            head, question = user["content"].removeprefix("Tools:\n").split("\nWhich tool answers this? ")
            plain_head, plain_question = plain_user["content"].split(". Which tool answers this? ")
            assert question == plain_question
            lines = [json.loads(line) for line in head.split("\n")]
            assert [t["name"] for t in lines] == plain_head.removeprefix("Tools: ").split(", ")
            assert all(next(iter(t)) == first and t["description"] for t in lines)
            asked = next(t for t in lines if t["name"] == reply["content"])
            assert reply["content"].split("_", 1)[1].replace("_", " ") in asked["description"]
    with pytest.raises(ValueError, match="listing='table'"):
        v2.match_item(random.Random(0), v2.Space("wide4"), False, "table")


def test_reverse_items_ask_for_the_key_of_a_listed_value():
    rng = random.Random(4)
    for _ in range(200):
        user, reply = v2.reverse_item(rng, v2.Space("wide5"))
        record_text, value = user["content"].removeprefix("Record: ").rsplit(". Which key has the value ", 1)
        record = json.loads(record_text)
        assert record[reply["content"]] == value.removesuffix("?")
        assert list(record.values()).count(value.removesuffix("?")) == 1


def test_lookup_set_mixes_reverse_lookups_and_match_drills():
    """The look-up warm-up (recipe v10): deterministic, about half reverse record look-ups and half match
    drills, every answer a word of the request, no tools offered."""
    space = v2.Space("wide5")
    cases = v2.lookup_set(400, 9, space=space)
    assert cases == v2.lookup_set(400, 9, space=space)
    reverse = [c for c in cases if c.record["messages"][0]["content"].startswith("Record: ")]
    assert 0.4 < len(reverse) / len(cases) < 0.6
    for c in cases:
        user, reply = c.record["messages"]
        assert c.kind == "lookup" and "tools" not in c.record and reply["content"] in user["content"]
