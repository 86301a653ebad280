"""The lookup probes' data: the match drill's items (scripts/probe_default_model.py)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_sft_data_v2 as v2  # noqa: E402
import probe_default_model as probe  # noqa: E402


def test_match_items_answer_with_the_listed_name_of_the_asked_topic():
    for topic_first in (False, True):
        rng = random.Random(3)
        for _ in range(200):
            user, reply = probe.match_item(rng, v2.Space("wide5"), topic_first)
            listed = (
                user["content"].removeprefix("Tools: ").split(". Which tool answers this? ")[0].split(", ")
            )
            question = user["content"].split(". Which tool answers this? ")[1]
            assert reply["content"] in listed and len(set(listed)) == len(listed) >= 2
            name = reply["content"]
            verb_end = name.rfind("_") if topic_first else name.find("_")
            topic = name[:verb_end] if topic_first else name[verb_end + 1 :]
            assert topic.replace("_", " ").lower() in question.lower()


def test_asked_kind_splits_weather_calculator_and_lookups():
    def target(*names):
        return {"tool_calls": [{"function": {"name": n, "arguments": "{}"}} for n in names]}

    assert probe.asked_kind(target("get_weather", "get_weather")) == "weather"
    assert probe.asked_kind(target("calculator")) == "calculator"
    assert probe.asked_kind(target("read_energy_use")) == "lookup"
    assert probe.asked_kind(target("get_weather", "read_energy_use")) == "lookup and weather"


def test_reverse_items_ask_for_the_key_of_a_listed_value():
    rng = random.Random(4)
    for _ in range(200):
        user, reply = probe.reverse_item(rng, v2.Space("wide5"))
        record_text, value = user["content"].removeprefix("Record: ").rsplit(". Which key has the value ", 1)
        record = json.loads(record_text)
        assert record[reply["content"]] == value.removesuffix("?")
        assert list(record.values()).count(value.removesuffix("?")) == 1
