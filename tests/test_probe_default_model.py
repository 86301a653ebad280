"""The lookup probes (scripts/probe_default_model.py): how a held-out case is split by the asked tool."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import probe_default_model as probe  # noqa: E402


def test_asked_kind_splits_weather_calculator_and_lookups():
    def target(*names):
        return {"tool_calls": [{"function": {"name": n, "arguments": "{}"}} for n in names]}

    assert probe.asked_kind(target("get_weather", "get_weather")) == "weather"
    assert probe.asked_kind(target("calculator")) == "calculator"
    assert probe.asked_kind(target("read_energy_use")) == "lookup"
    assert probe.asked_kind(target("get_weather", "read_energy_use")) == "lookup and weather"
