#!/usr/bin/env python3
"""SFT data and held-out evals of the embedded default model, recipe v2 (issue 18): copy, don't recall.

    python scripts/make_sft_data_v2.py --out sft.jsonl --n 12000 --seed 0 [--val-out val.jsonl]
    python scripts/make_sft_data_v2.py --out long.jsonl --n 1200 --seed 5 --long-share 0.5 --max-tokens 1536
    python scripts/make_sft_data_v2.py --eval-model DIR [--grammar] [--per-kind 30] [--seed 777]
    python scripts/make_sft_data_v2.py --passkey-model DIR --lengths 8192 32768     # text passkey, engine

Design choices:
- Open-ended entity spaces, drawn per example: place names are 2-3 random syllables (sometimes two words),
  tool names are `verb_topic` with the topic a real noun or a random pseudo-word, argument names vary,
  values are random numbers with random units, identifiers random letter/digit codes. A model can only be
  right by reading the request and the tool result: nothing is worth memorising.
- Held-out spaces (`Space("heldout")`), never used in training: a disjoint syllable set (the syllables
  with coda "r"; a held-out name cannot even be segmented into training syllables), disjoint topic nouns, verbs, argument names, units
  and weather conditions, and the numbers in a fixed hash class (a held-out value never appears as a
  value in training). Evals use these spaces and another seed; training uses `Space("train")` (recipe v3
  also the open space).
- The open space (`Space("open")`, `--space open`, recipe v3): the training tables with names of random
  letters instead of syllables, so that copying is learned for any letters, not for the training syllables'
  tokens only (a model trained on syllable names alone copies held-out names at 0.1-0.2). Its words never
  split into held-out syllables. The evals also report a bare copy probe per name space (`copy_probe`).
- The wide space (`Space("wide")`, `--space wide`, recipe v4): the open space's names, and every table
  (topics, verbs, argument names, units, conditions, kinds, words) replaced by words of the standard
  library's docstrings (`stdlib_lexicon`, ~2,400 words, none of a held-out table), so tool selection is
  learned as matching the request's words to a tool's, not as recognising the training topics.
- The wide5 space (`--space wide5`, recipe v8): wide4 with every schema's surface varied (descriptions kept,
  dropped or unrelated; an optional property no call uses; get_weather in the README's, the SDK tests' and
  the curl example's shapes, and offered as a distractor), and three times the call / refusal contrast
  pairs: v7 decided whether to call by how familiar a schema looked, not by whether a tool covered the topic.
- The mix teaches: tool selection among several offered tools with varying names and descriptions;
  parallel calls (two or three entities, or two tools, in one turn); an answer that restates the asked
  entity and every value of the tool result; small arithmetic answered directly (calculator offered or
  not), larger arithmetic through the calculator when offered; the exact reply "I can't help with that."
  (no tool call) for requests outside its skills, including a lookup whose tool is not offered; plain
  chat; standard-library code completion (kept from v1); long examples (many long tool definitions and a
  long tool-use history, or a text passkey in long filler) for the length-extension stage.
- Short drills beside the mix, each its own flag: `--copy-set` (the copy warm-up), `--drill-set` (arithmetic,
  spelling, counting), `--decide-set` (recipe v9: call / refusal pairs cut after the decision) and
  `--lookup-set` (recipe v10: the backward look-up, a listed value's key or a question's verb-first tool name).
- Deterministic from the seed and the Python standard library (byte-for-byte the same file).
- Eval kinds (scored exactly, greedy, through the engine; with `--grammar` each reply is constrained by
  the server's reply grammar, tool_choice auto): tool_call = exactly the right calls (names, arguments,
  order); tool_answer = after the results, no call and the reply contains the asked entities and every
  result value; no_call = tools offered but not needed → the exact reply, no call; chat = exact reply;
  refusal = a request outside its skills (half with held-out phrasings) → starts with "I can't help with
  that" and no call; code = the first line of a continuation is exact.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import string
import sys
import time
from dataclasses import dataclass
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sft_data import (  # noqa: E402
    IDENTITY,
    SYSTEMS,
    TOOLS,
    code_conversation,
    stdlib_functions,
    stdlib_modules,
)

REFUSAL = "I can't help with that."
RECIPE_VERSION = 2

# ------------------------------------------------------------------------------------- entity spaces

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "tr",
    "st",
]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "n", "r", "l", "s"]
_SYLLABLES = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]  # 500
# held out: the 100 syllables with coda "r" (training names never have one; a held-out name cannot be
# segmented into training syllables either, `Space.word` checks)
_HELD_SYL = frozenset(o + v + "r" for o in _ONSETS for v in _VOWELS)

_TOPICS = {
    "train": ["population", "elevation", "area", "humidity", "wind speed", "rainfall", "price", "rating",
              "distance", "depth", "altitude", "visitors", "score", "length", "capacity", "budget",
              "temperature", "air quality", "noise level", "traffic"],
    "heldout": ["water level", "snow depth", "ticket price", "crowd size", "pollen count", "tide height",
                "energy use", "occupancy"],
}  # fmt: skip
_VERBS = {
    "train": ["get", "lookup", "fetch", "find", "query", "check"],
    "heldout": ["read", "retrieve", "show"],
}
_ARGS = {
    "train": ["city", "location", "place", "name", "town", "site", "region", "query", "target", "where"],
    "heldout": ["locale", "spot", "destination", "venue"],
}
_UNITS = {
    "train": ["km", "m", "kg", "people", "points", "percent", "mm", "km/h", "USD", "EUR", "liters", "stars"],
    "heldout": ["miles", "ft", "tons", "seats", "kWh", "inches"],
}
_CONDITIONS = {
    "train": ["sunny", "cloudy", "partly cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy"],
    "heldout": ["hazy", "drizzly", "overcast"],
}
_KINDS = {"train": ["city", "place", "town", "region", "site"], "heldout": ["area", "village"]}
REAL_CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Oslo", "Tokyo", "Cairo", "Lima", "Sydney",
               "Toronto", "Mumbai", "Seoul", "Dublin", "Vienna", "Nairobi", "Chicago", "Lisbon"]  # fmt: skip
_WORDS = {"train": ["apple", "river", "cloud", "stone", "tiger", "piano", "lemon", "rocket", "garden", "silver",
                    "candle", "window", "forest", "bridge", "marble", "pepper"],
          "heldout": ["violet", "harbor", "copper", "meadow", "saddle", "lantern"]}  # fmt: skip


def _held_number(v: int) -> bool:
    """The fixed hash class of held-out integers (about 1 in 5, no pattern in the digits)."""
    return (abs(v) * 2654435761 + 12345) % 2**32 % 5 == 0


def _segments_into(name: str, syllables: frozenset[str]) -> bool:
    """Whether a lower-case name splits into syllables of the set (dynamic programming over the letters)."""
    ok = [True] + [False] * len(name)
    for end in range(1, len(name) + 1):
        ok[end] = any(ok[s] and name[s:end] in syllables for s in range(max(0, end - 3), end))
    return ok[-1]


@dataclass(frozen=True)
class Space:
    """The entity spaces of one split: "train" or "heldout" (see the module docstring)."""

    split: str

    @cached_property
    def syllables(self) -> list[str]:
        held = self.split == "heldout"
        return [s for s in _SYLLABLES if (s in _HELD_SYL) == held]

    @property
    def _lexical(self) -> bool:
        """wide and later: the tables' words come from the stdlib lexicon."""
        return self.split in ("wide", "wide2", "wide3", "wide4", "wide5")

    @property
    def readme_weather(self) -> bool:
        """wide2 and later: most weather tools carry the README's schema exactly, and more lookups are refused."""
        return self.split in ("wide2", "wide3", "wide4", "wide5")

    @property
    def contrast(self) -> bool:
        """wide3 and later: one-word argument names, and a tenth of the draws are call / refusal contrast pairs
        (wide5: three tenths)."""
        return self.split in ("wide3", "wide4", "wide5")

    @property
    def varied(self) -> bool:
        """wide5 (recipe v8): every offered schema varies in its surface (descriptions present, absent or
        unrelated words; an optional property no call uses; get_weather with or without `unit`), so that whether
        to call depends on the asked topic and the tools' names alone, not on a schema's familiar shape."""
        return self.split == "wide5"

    @property
    def _tables(self) -> str:
        return "heldout" if self.split == "heldout" else "train"  # "open"/"wide": the training number class

    @cached_property
    def _train_syl(self) -> frozenset[str]:
        return frozenset(s for s in _SYLLABLES if s not in _HELD_SYL)

    def word(self, rng: random.Random, lo: int = 2, hi: int = 3) -> str:
        if self.split in ("open2", "wide4", "wide5"):
            return _piece_word(rng, 2 * lo, 3 * hi)
        if self.split == "open" or self._lexical:
            return _open_word(rng, 2 * lo, 3 * hi)
        while True:
            w = "".join(rng.choice(self.syllables) for _ in range(rng.randint(lo, hi)))
            if self.split == "train" or not _segments_into(w, self._train_syl):
                return w

    def place(self, rng: random.Random, real_share: float = 0.0) -> str:
        if rng.random() < real_share:
            return rng.choice(REAL_CITIES)
        name = self.word(rng).capitalize()
        if rng.random() < 0.15:
            name += " " + self.word(rng, 2, 2).capitalize()
        return name

    def number(self, rng: random.Random, lo: int, hi: int) -> int:
        while True:
            v = rng.randint(lo, hi)
            if _held_number(v) == (self._tables == "heldout"):
                return v

    def value(self, rng: random.Random) -> int | float:
        """A tool-result value: an integer of 1-5 digits or a one-decimal number."""
        v = self.number(rng, 0, 10 ** rng.randint(1, 5) - 1)
        return round(v / 10, 1) if rng.random() < 0.25 and v % 10 else v

    def pick(self, rng: random.Random, table: dict[str, list[str]]) -> str:
        if self._lexical:  # any word of the lexicon, not the table (one or two for a topic)
            lexicon = stdlib_lexicon()
            # a topic is one or two words; wide2: argument names too, in snake_case
            compound = table is _TOPICS or (table is _ARGS and self.split == "wide2")
            n = rng.choice([1, 2]) if compound else 1
            return (" " if table is _TOPICS else "_").join(rng.choice(lexicon) for _ in range(n))
        return rng.choice(table[self._tables])

    def topic(self, rng: random.Random) -> str:
        return (
            self.pick(rng, _TOPICS)
            if rng.random() < (0.8 if self._lexical else 0.5)
            else self.word(rng, 2, 3)
        )

    def code(self, rng: random.Random) -> str:
        """An identifier like KX-4821 (letters are random; the number is in this split's class)."""
        letters = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(2, 3)))
        return f"{letters}-{self.number(rng, 100, 99999)}"


_CONSONANTS = [c for c in string.ascii_lowercase if c not in "aeiou"]


def _open_word(rng: random.Random, lo: int, hi: int) -> str:
    """A random word of `lo`-`hi` letters from the open space: half are uniformly random letters, half
    alternate random consonant clusters (any consonants) and vowels, so the multi-letter pieces the tokenizer
    makes of pronounceable names are copied too, not only single letters. This teaches copying of any letter
    sequence, not only of the training syllables. A word that splits into held-out syllables is redrawn,
    so no held-out name is ever a training item."""
    while True:
        n = rng.randint(lo, hi)
        if rng.random() < 0.5:
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
        else:
            parts, vowel = [], rng.random() < 0.3
            while sum(map(len, parts)) < n:
                pool = "aeiouy" if vowel else _CONSONANTS
                parts.append("".join(rng.choice(pool) for _ in range(rng.choice([1, 1, 1, 2]))))
                vowel = not vowel
            w = "".join(parts)[:n]
        if not _segments_into(w, _HELD_SYL):
            return w


def _piece_word(rng: random.Random, lo: int, hi: int) -> str:
    """A word of the open2 / wide4 spaces (recipe v6): half are `_open_word`s, half join one to three pieces
    of 2-5 letters cut from lexicon words ("ret" + "amet" + "fi"). Random letters tokenize into one- and
    two-letter tokens, so a model trained on them still failed to copy names made of the tokenizer's longer,
    word-like pieces ("tur", "par", "orm" in held-out names: 0.625 copied); with these words in the copy
    warm-up it copied 0.925 (docs/default-model.md, recipe v6). As for `_open_word`, a word that splits into
    held-out syllables is redrawn."""
    lexicon = stdlib_lexicon()
    while True:
        if rng.random() < 0.5:
            return _open_word(rng, lo, hi)
        parts = []
        for _ in range(rng.choice([1, 2, 2, 3])):
            w = rng.choice(lexicon)
            n = rng.randint(2, min(5, len(w)))
            start = rng.randint(0, len(w) - n)
            parts.append(w[start : start + n])
        word = "".join(parts)
        if not _segments_into(word, _HELD_SYL):
            return word


@cache
def stdlib_lexicon(limit_files: int = 400) -> list[str]:
    """The wide space's words: the lower-case words of 3-10 letters used at least three times in the docstrings
    of the standard library's modules (the same files as the code-completion set), sorted: a few thousand
    English and programming words. Left out: every word of a held-out table (topics, verbs, argument names,
    units, conditions, kinds, words) and every word that splits into held-out syllables, so no held-out
    entity is ever a training one."""
    held = {w for table in _HELD_TABLES for entry in table["heldout"] for w in entry.lower().split()}
    counts: dict[str, int] = {}
    for _, tree in stdlib_modules(limit_files):
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for w in re.findall(r"(?<![\w.])[a-z]{3,10}(?![\w.])", ast.get_docstring(node) or ""):
                    counts[w] = counts.get(w, 0) + 1
    return sorted(
        w for w, c in counts.items() if c >= 3 and w not in held and not _segments_into(w, _HELD_SYL)
    )


_HELD_TABLES = [_TOPICS, _VERBS, _ARGS, _UNITS, _CONDITIONS, _KINDS, _WORDS]
TRAIN, HELDOUT = Space("train"), Space("heldout")
# "open": training tables (topics, verbs, units, ...) and number class, names of random letters (issue 18,
# session 8: a model trained on syllable names copies training-syllable names at 0.93 and held-out-syllable
# names at 0.18 or random letters at 0.08; the open set is what makes copying generic)
OPEN = Space("open")
# "wide" (recipe v4): the open space's names, and topics, verbs, argument names, units, conditions, kinds and
# words from the standard library's lexicon instead of the fixed tables: the open space still taught the
# tables' topics, so the v3 model refused a lookup whose held-out topic ("pollen count") an offered tool
# covered; here the only way to pick the tool is to match the request's words to the tool's
WIDE = Space("wide")


def _call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _fmt(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v


# ----------------------------------------------------------------------------------------- the tools


@dataclass(eq=False)
class Lookup:
    """One offered tool and what it is about; `ask`/`answer` make a request, a call, a result and a reply."""

    name: str
    topic: str
    arg: str
    kind: str
    desc: str
    unit: str | None = None
    weather: bool = False
    arg_desc: str | None = None  # the argument's description (default "The {kind} name"; "" = none)
    unit_prop: bool = True  # weather: the `unit` property is offered (wide5: not always)
    extra: tuple[str, dict[str, Any]] | None = None  # wide5: an optional property that no call uses

    @property
    def schema(self) -> dict[str, Any]:
        arg: dict[str, Any] = {"type": "string"}
        arg_desc = f"The {self.kind} name" if self.arg_desc is None else self.arg_desc
        if arg_desc:
            arg["description"] = arg_desc
        props: dict[str, Any] = {self.arg: arg}
        if self.weather and self.unit_prop:
            props["unit"] = {"type": "string", "enum": ["celsius", "fahrenheit"]}
        if self.extra:
            props[self.extra[0]] = self.extra[1]
        params = {"type": "object", "properties": props, "required": [self.arg]}
        function: dict[str, Any] = {"name": self.name, "description": self.desc, "parameters": params}
        if not self.desc:
            del function["description"]
        return {"type": "function", "function": function}


def _vary(rng: random.Random, tool: Lookup) -> Lookup:
    """wide5: a random schema surface for `tool` (see `Space.varied`): the description kept 55 %, dropped
    30 %, unrelated lexicon words 15 %; the argument's description kept, dropped or unrelated alike; an
    optional extra property 30 %; a weather tool's `unit` offered half the time."""
    lexicon = stdlib_lexicon()

    def words() -> str:
        return " ".join(rng.choice(lexicon) for _ in range(rng.randint(2, 6))).capitalize() + "."

    r = rng.random()
    tool.desc = tool.desc if r < 0.55 else "" if r < 0.85 else words()
    r = rng.random()
    tool.arg_desc = tool.arg_desc if r < 0.55 else "" if r < 0.85 else words()
    if rng.random() < 0.3:
        prop: dict[str, Any] = {"type": rng.choice(["string", "integer", "boolean"])}
        if rng.random() < 0.5:
            prop["description"] = words()
        tool.extra = (rng.choice(lexicon), prop)
    if tool.weather:
        tool.unit_prop = rng.random() < 0.5
    return tool


def make_lookup(rng: random.Random, space: Space, taken: set[str]) -> Lookup:
    while True:
        topic, verb = space.topic(rng), space.pick(rng, _VERBS)
        name = f"{verb}_{topic.replace(' ', '_')}"
        if topic not in taken:
            break
    taken.add(topic)
    kind = space.pick(rng, _KINDS)
    arg = space.pick(rng, _ARGS) if rng.random() < 0.85 else space.word(rng, 1, 2)
    desc = rng.choice(
        ["{V} the {t} of a {k}.", "Returns the current {t} for a given {k}.", "{V} {t} data for one {k}.",
         "Look up the {t} of a {k} by name."]
    ).format(V=verb.capitalize(), t=topic, k=kind)  # fmt: skip
    tool = Lookup(name, topic, arg, kind, desc, space.pick(rng, _UNITS) if rng.random() < 0.8 else None)
    return _vary(rng, tool) if space.varied else tool


def weather_tool(rng: random.Random, space: Space) -> Lookup:
    """`get_weather(city, unit)`, the README's tool, with the description and argument of v1 (or a variant):
    70 % of them the README's schema (wide2 and later, `space.readme_weather`: exactly, its argument description
    too; the v4 pilot, trained on "The city name" alone, did not close the argument key after "city" with it).
    wide5 (`space.varied`): the README's schema a quarter of the time, the SDK tests' (no `unit`) a quarter, the
    README's curl example (no descriptions, no `unit`) a fifth, else a `_vary`d variant (recipe v7 refused the
    latter two: every weather tool it was trained on offered `unit`, docs/default-model.md)."""
    readme = TOOLS["get_weather"]["function"]
    city_desc = readme["parameters"]["properties"]["city"]["description"]
    r = rng.random()
    if space.varied and r < 0.7:
        tool = Lookup("get_weather", "weather", "city", "city", readme["description"], weather=True,
                      arg_desc=city_desc, unit_prop=r < 0.25)  # fmt: skip
        if r >= 0.5:  # the curl example: no descriptions
            tool.desc, tool.arg_desc = "", ""
        return tool
    if r < 0.7:
        return Lookup("get_weather", "weather", "city", "city", readme["description"], weather=True,
                      arg_desc=city_desc if space.readme_weather else None)  # fmt: skip
    variant = Lookup("get_weather", "weather", rng.choice(["city", "location"]), "city",
                     "Current weather conditions for a location.", weather=True)  # fmt: skip
    return _vary(rng, variant) if space.varied else variant


def lookup_turn(
    rng: random.Random, space: Space, tool: Lookup, entity: str
) -> tuple[str, dict, dict, str, list[str]]:
    """(question, arguments, result, answer, must-mention) for one entity and one tool."""
    if tool.weather:
        unit = rng.choice([None, None, None, "celsius", "fahrenheit"])
        unit = unit if tool.unit_prop else None  # no `unit` offered: none asked for
        q = rng.choice(
            ["What is the weather in {e}?", "What's the weather like in {e} today?", "How is the weather in {e}?",
             "Tell me the current weather in {e}.", "weather in {e}?", "Is it raining in {e}?",
             "How warm is it in {e}?"]
        ).format(e=entity)  # fmt: skip
        args: dict[str, Any] = {tool.arg: entity}
        if unit:
            q = q.rstrip("?.") + (" in Fahrenheit?" if unit == "fahrenheit" else " in Celsius?")
            args["unit"] = unit
        temp = space.number(rng, -30, 110 if unit == "fahrenheit" else 45)
        cond = space.pick(rng, _CONDITIONS)
        sym = "°F" if unit == "fahrenheit" else "°C"
        result = {tool.arg: entity, "temperature": temp, "unit": unit or "celsius", "condition": cond}
        answer = rng.choice(
            [f"It is {cond} in {entity} with a temperature of {temp}{sym}.", f"The weather in {entity} is {cond}, {temp}{sym}.",
             f"Right now {entity} is {cond} and {temp}{sym}."]
        )  # fmt: skip
        return q, args, result, answer, [entity, str(temp), cond]
    q = rng.choice(
        ["What is the {t} of {e}?", "{T} of {e}?", "Can you tell me the {t} of {e}?", "I need the {t} for {e}.",
         "What's the current {t} in {e}?", "Look up the {t} of {e}, please."]
    ).format(t=tool.topic, T=tool.topic.capitalize(), e=entity)  # fmt: skip
    value = space.value(rng)
    key = tool.topic.replace(" ", "_")
    result: dict[str, Any] = {tool.arg: entity, key: value}
    unit = f" {tool.unit}" if tool.unit else ""
    if tool.unit:
        result["unit"] = tool.unit
    answer = rng.choice(
        [f"The {tool.topic} of {entity} is {_fmt(value)}{unit}.", f"{entity} has a {tool.topic} of {_fmt(value)}{unit}.",
         f"The current {tool.topic} in {entity} is {_fmt(value)}{unit}."]
    )  # fmt: skip
    mention = [entity, _fmt(value)] + ([tool.unit] if tool.unit else [])
    return q, {tool.arg: entity}, result, answer, mention


def _calc_question(rng: random.Random, a: int, op: str, b: int) -> tuple[str, str]:
    """(question, the expression as the user wrote it)."""
    expr = f"{a} {op} {b}" if rng.random() < 0.7 else f"{a}{op}{b}"
    return rng.choice(
        ["What is {e}?", "Calculate {e}.", "Compute {e} please.", "How much is {e}?", "{e} = ?"]
    ).format(e=expr), expr


def small_arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """(question, answer, reasoning): a sum, difference or product small enough to do in one's head."""
    op = rng.choice(["+", "+", "-", "*"])
    a, b = (rng.randint(0, 12), rng.randint(0, 12)) if op == "*" else (rng.randint(0, 50), rng.randint(0, 50))
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    q, expr = _calc_question(rng, a, op, b)
    if rng.random() < 0.2:
        q = f"What is {a} {'plus' if op == '+' else 'minus' if op == '-' else 'times'} {b}?"
    return q, f"{a} {op} {b} = {value}.", f"{a} {op} {b} = {value}."


def big_arithmetic(rng: random.Random) -> tuple[str, str, int]:
    """(question, expression, value): too large to do reliably without the calculator."""
    op = rng.choice(["+", "-", "*", "*", "/"])
    a, b = rng.randint(100, 9999), rng.randint(13, 999)
    if op == "/":
        a = a * b
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    q, expr = _calc_question(rng, a, op, b)
    return q, expr, value


# ------------------------------------------------------------------------------------- conversations


@dataclass
class Case:
    """A conversation (training record) with what an eval needs: its kind and the text the answer must hold."""

    kind: str
    record: dict[str, Any]
    mention: list[str] | None = None


def _system(rng: random.Random, messages: list[dict[str, Any]], share: float = 0.3) -> None:
    if rng.random() < share:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})


def _offer(
    rng: random.Random, space: Space, needed: list[Lookup], extra: tuple[int, int] = (0, 3)
) -> list[Lookup]:
    """The needed tools plus distractors (other topics; sometimes the standard tools), shuffled. wide5: get_weather
    is a distractor in 30 % (the stage-3b model without it called get_weather for "Tell me a joke." whenever
    the README's schema was offered: no refusal or chat it trained on offered get_weather)."""
    taken = {t.topic for t in needed}
    tools = list(needed)
    for _ in range(rng.randint(*extra)):
        tools.append(make_lookup(rng, space, taken))
    if space.varied and "weather" not in taken and rng.random() < 0.3:
        tools.append(weather_tool(rng, space))
    rng.shuffle(tools)
    return tools


def _schemas(tools: list[Lookup], rng: random.Random, calculator: bool = False) -> list[dict[str, Any]]:
    out = [t.schema for t in tools]
    if calculator:
        out.insert(rng.randint(0, len(out)), TOOLS["calculator"])
    return out


def tool_use(rng: random.Random, space: Space) -> Case:
    """One, two or three lookups in one turn (parallel calls), results, a grounded answer; sometimes a
    follow-up turn. Weather in ~40 % of them (real city names in a quarter of the training ones)."""
    real = 0.25 if space.split == "train" else 0.0
    n_calls = rng.choices([1, 2, 3], [0.72, 0.22, 0.06])[0]
    if rng.random() < 0.4:
        tools_needed = [weather_tool(rng, space)]
    else:
        tools_needed = [make_lookup(rng, space, set())]
    if n_calls > 1 and rng.random() < 0.35:  # two different tools
        tools_needed.append(make_lookup(rng, space, {tools_needed[0].topic}))
    entities = []
    while len(entities) < n_calls:
        e = space.place(rng, real)
        if e not in entities:
            entities.append(e)
    turns = []
    for i, e in enumerate(entities):
        tool = tools_needed[min(i, len(tools_needed) - 1)]
        turns.append((tool, *lookup_turn(rng, space, tool, e)))
    if len(turns) == 1:
        question = turns[0][1]
    elif len({t[0].name for t in turns}) == 1 and not turns[0][0].weather:
        names = (
            " and ".join(entities)
            if len(entities) == 2
            else f"{entities[0]}, {entities[1]} and {entities[2]}"
        )
        question = rng.choice(["What is the {t} of {n}?", "{T} of {n}?", "Compare the {t} of {n}."]).format(
            t=turns[0][0].topic, T=turns[0][0].topic.capitalize(), n=names
        )
    elif len({t[0].name for t in turns}) == 1:
        names = (
            " and ".join(entities)
            if len(entities) == 2
            else f"{entities[0]}, {entities[1]} and {entities[2]}"
        )
        question = rng.choice(
            ["What is the weather in {n}?", "How is the weather in {n}?", "weather in {n}?"]
        ).format(n=names)
        turns = [
            (t[0], *lookup_turn(random.Random(rng.random()), space, t[0], e)) for t, e in zip(turns, entities)
        ]
        for k, t in enumerate(turns):  # no unit: the question does not ask for one
            args = {t[0].arg: entities[k]}
            result = dict(t[3], unit="celsius")
            temp, cond = result["temperature"], result["condition"]
            turns[k] = (
                t[0],
                t[1],
                args,
                result,
                f"{entities[k]} is {cond}, {temp}°C.",
                [entities[k], str(temp), cond],
            )
    else:
        question = turns[0][1] + " Also, " + turns[1][1][0].lower() + turns[1][1][1:]
        if len(turns) > 2:
            turns = turns[:2]
    messages: list[dict[str, Any]] = []
    _system(rng, messages)
    messages.append({"role": "user", "content": question})
    preface = rng.choice(["", "", "", "", "Let me check.", "I will look that up."])
    messages.append(
        {"role": "assistant", "content": preface, "tool_calls": [_call(t[0].name, t[2]) for t in turns]}
    )
    for t in turns:
        messages.append({"role": "tool", "content": json.dumps(t[3], ensure_ascii=False)})
    messages.append({"role": "assistant", "content": " ".join(t[4] for t in turns)})
    mention = [m for t in turns for m in t[5]]
    offered = _offer(rng, space, list(dict.fromkeys(t[0] for t in turns)))
    if rng.random() < 0.15:  # a follow-up about another place with one of the offered tools
        tool = rng.choice(offered)
        q, args, result, answer, _ = lookup_turn(rng, space, tool, space.place(rng, real))
        messages += [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [_call(tool.name, args)]},
            {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
            {"role": "assistant", "content": answer},
        ]
    return Case(
        "tool_call", {"messages": messages, "tools": _schemas(offered, rng, rng.random() < 0.3)}, mention
    )


def _near_miss(rng: random.Random, space: Space, wanted: Lookup) -> list[Lookup]:
    """[a tool whose two-word topic shares one word with `wanted`'s] ("buffer size" asked, `get_buffer_count`),
    or [] when the drawn word happens to be the replaced one."""
    near = make_lookup(rng, space, {wanted.topic})
    words = wanted.topic.split(" ")
    words[rng.randrange(len(words))] = rng.choice(stdlib_lexicon())
    if " ".join(words) == wanted.topic:
        return []
    near.topic = " ".join(words)
    near.name = near.name.split("_", 1)[0] + "_" + near.topic.replace(" ", "_")
    return [near]


def _pair_head(
    rng: random.Random, q: str, others: list[Lookup], wanted: Lookup
) -> tuple[list[Lookup], list[dict[str, Any]]]:
    """(the call half's tools: `others` and `wanted` shuffled, the messages both halves share: a system
    prompt sometimes, then the question)."""
    with_tool = [*others, wanted]
    rng.shuffle(with_tool)
    head: list[dict[str, Any]] = []
    _system(rng, head)
    head.append({"role": "user", "content": q})
    return with_tool, head


def contrast_pair(rng: random.Random, space: Space) -> list[Case]:
    """The same lookup question twice, with the same other tools offered: once with the asked topic's tool
    among them (→ the call, its result and the grounded answer) and once without it (→ the refusal), so
    whether to call is learned from the offered tools alone (wide3; the v4 build refused held-out topics
    whose tool was offered, and called tools for topics it was not). wide5: the asked tool is get_weather in
    three tenths of the pairs, and a two-word topic gets a near miss among the others half the time (a tool
    whose topic shares one of its words: "buffer size" asked, only "get_buffer_count" offered → refusal)."""
    if space.varied and rng.random() < 0.3:
        wanted = weather_tool(rng, space)
    else:
        wanted = make_lookup(rng, space, set())
    q, args, result, answer, mention = lookup_turn(rng, space, wanted, space.place(rng))
    others = [t for t in _offer(rng, space, [], (1, 3)) if t.topic != wanted.topic]
    others = others or [make_lookup(rng, space, {wanted.topic})]
    if space.varied and " " in wanted.topic and rng.random() < 0.5:
        others += _near_miss(rng, space, wanted)
    with_tool, head = _pair_head(rng, q, others, wanted)
    call = head + [
        {"role": "assistant", "content": "", "tool_calls": [_call(wanted.name, args)]},
        {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": answer},
    ]
    refuse = head + [{"role": "assistant", "content": REFUSAL}]
    return [
        Case("tool_call", {"messages": call, "tools": _schemas(with_tool, rng)}, mention),
        Case("refusal", {"messages": refuse, "tools": _schemas(others, rng)}),
    ]


def calculator_use(rng: random.Random, space: Space) -> Case:
    """Large arithmetic with the calculator offered: call with the expression as written, answer with the result."""
    q, expr, value = big_arithmetic(rng)
    messages: list[dict[str, Any]] = []
    _system(rng, messages)
    messages += [
        {"role": "user", "content": q},
        {"role": "assistant", "content": "", "tool_calls": [_call("calculator", {"expression": expr})]},
        {"role": "tool", "content": json.dumps({"result": value})},
        {"role": "assistant", "content": f"{expr} = {value}."},
    ]
    tools = _schemas(_offer(rng, space, [], (0, 2)), rng, calculator=True)
    return Case("tool_call", {"messages": messages, "tools": tools}, [str(value)])


GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What can I do for you?"]  # equally right


def _chat_turn(rng: random.Random, space: Space) -> tuple[str, str, str | None]:
    """(question, exact answer, reasoning or None): things the model can do without a tool."""
    kind = rng.randrange(6)
    if kind == 0:
        return (
            rng.choice(["Hi!", "Hello", "hello there", "Hey", "Good morning!", "Hi, how are you?"]),
            rng.choice(GREETING_REPLIES),
            None,
        )
    if kind == 1:
        return rng.choice(["Who are you?", "What is your name?", "What are you?"]), IDENTITY, None
    if kind == 2:
        return small_arithmetic(rng)
    if kind == 3:
        n, start = rng.randint(3, 7), space.number(rng, 1, 200)
        return (
            f"Count from {start} to {start + n - 1}.",
            ", ".join(str(start + i) for i in range(n)) + ".",
            None,
        )
    if kind == 4:
        words = [
            space.pick(rng, _WORDS) if rng.random() < 0.5 else space.word(rng, 1, 2)
            for _ in range(rng.randint(2, 4))
        ]
        return f"Repeat these words: {' '.join(words)}", " ".join(words), None
    thing = space.place(rng)
    return (
        rng.choice([f"Spell {thing}.", f"Spell the name {thing}."]),
        " ".join(thing.replace(" ", "")) + ".",
        None,
    )


def chat(rng: random.Random, space: Space, with_tools: bool) -> Case:
    messages: list[dict[str, Any]] = []
    _system(rng, messages)
    for _ in range(1 if rng.random() < 0.8 else 2):
        q, a, reasoning = _chat_turn(rng, space)
        messages.append({"role": "user", "content": q})
        reply: dict[str, Any] = {"role": "assistant", "content": a}
        if reasoning and not with_tools and rng.random() < 0.3:
            reply["reasoning_content"] = f"I need to compute this. {reasoning}"
        messages.append(reply)
    rec: dict[str, Any] = {"messages": messages}
    if with_tools:
        rec["tools"] = _schemas(_offer(rng, space, [], (1, 3)), rng, calculator=rng.random() < 0.5)
    return Case("no_call" if with_tools else "chat", rec)


_OUTSIDE = {
    "train": ["Translate '{p}' into {l}.", "Tell me a joke.", "Write a poem about {e}.", "Book a flight to {e}.",
              "Send an email to {e}.", "What is the stock price of {c}?", "Summarize the news from {e}.",
              "Set an alarm for {h}:00.", "Play some music.", "Order a taxi to {e}.", "Who will win the next election?",
              "What is the meaning of life?", "Draw a picture of {e}.", "Call {e} for me."],
    "heldout": ["Write a haiku about {e}.", "Reserve a table in {e} tonight.", "Recommend a movie.",
                "Translate this to {l}: {p}", "Buy shares of {c}.", "Remind me to call {e} tomorrow."],
}  # fmt: skip
_PHRASES = [
    "good morning",
    "thank you",
    "where is the station",
    "I like tea",
    "see you later",
    "happy birthday",
]
_LANGS = ["French", "German", "Spanish", "Japanese", "Italian", "Chinese"]


def refusal(rng: random.Random, space: Space, templates: str) -> Case:
    """A request outside its skills: with or without tools, or a lookup whose tool is not offered."""
    messages: list[dict[str, Any]] = []
    _system(rng, messages)
    tools: list[Lookup] = []
    if rng.random() < (0.6 if space.readme_weather else 0.35):  # a topic no offered tool covers
        wanted = make_lookup(rng, space, set())
        q = lookup_turn(rng, space, wanted, space.place(rng))[0]
        tools = _offer(rng, space, [], (1, 3))
        tools = [t for t in tools if t.topic != wanted.topic] or [make_lookup(rng, space, {wanted.topic})]
    else:
        q = rng.choice(_OUTSIDE[templates]).format(
            p=rng.choice(_PHRASES),
            l=rng.choice(_LANGS),
            e=space.place(rng),
            c=space.code(rng).split("-")[0],
            h=rng.randint(5, 11),
        )
        if rng.random() < 0.5:
            tools = _offer(rng, space, [], (1, 3))
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": REFUSAL}]
    rec: dict[str, Any] = {"messages": messages}
    if tools:
        rec["tools"] = _schemas(tools, rng, calculator=rng.random() < 0.3)
    return Case("refusal", rec)


_FILLER = ["The grass is green.", "The sky is blue.", "The sun is warm.", "Here we go.", "There and back again.",
           "The river flows to the sea.", "Birds sing in the morning."]  # fmt: skip


def passkey_conversation(rng: random.Random, space: Space, tokens: int, depth: float | None = None) -> Case:
    """A text passkey: a five-digit key hidden in ~`tokens` tokens of filler; the answer is the key."""
    key = space.number(rng, 10000, 99999)
    n = max(1, (tokens - 60) // 9)  # a filler sentence is ~9 tokens, the question ~60
    at = int(n * (rng.random() if depth is None else depth))
    parts = [rng.choice(_FILLER) for _ in range(n)]
    parts.insert(at, f"The pass key is {key}. Remember it. {key} is the pass key.")
    q = "There is a pass key hidden in this text. Find it.\n" + " ".join(parts) + "\nWhat is the pass key?"
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": f"The pass key is {key}."}]
    return Case("passkey", {"messages": messages}, [str(key)])


def long_tool_use(rng: random.Random, space: Space, max_tokens: int) -> Case:
    """An agent-sized prompt: many tools with long descriptions and a long history of earlier lookups
    (not trained on), then a new request (a call, grounded answer, refusal or chat)."""
    budget = rng.randint(max_tokens // 4, max_tokens) - 150  # room for the request and reply
    tools: list[Lookup] = []
    taken: set[str] = set()
    for _ in range(rng.randint(4, max(5, budget // 200))):
        t = make_lookup(rng, space, taken)
        t.desc += " " + " ".join(rng.choice(_FILLER) for _ in range(rng.randint(2, 12)))
        tools.append(t)
    tools.append(weather_tool(rng, space))

    def tokens(obj: Any) -> int:  # rough: ~3 characters a token in JSON-ish text
        return len(json.dumps(obj, ensure_ascii=False)) // 3

    history: list[dict[str, Any]] = []
    used = 120 + sum(tokens(t.schema) for t in tools)
    while True:
        tool = rng.choice(tools)
        q, args, result, answer, _ = lookup_turn(rng, space, tool, space.place(rng))
        turn = [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [_call(tool.name, args)], "train": False},
            {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
            {"role": "assistant", "content": answer, "train": False},
        ]
        if used + tokens(turn) > budget:
            break
        history += turn
        used += tokens(turn)
    r = rng.random()
    if r < 0.6:
        tool = rng.choice(tools)
        q, args, result, answer, mention = lookup_turn(rng, space, tool, space.place(rng))
        tail = [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [_call(tool.name, args)]},
            {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
            {"role": "assistant", "content": answer},
        ]
        kind = "tool_call"
    elif r < 0.8:
        tail = refusal(rng, space, "train").record["messages"][-2:]
        kind, mention = "refusal", None
    else:
        c = chat(rng, space, True)
        tail, kind, mention = c.record["messages"][-2:], "no_call", None
    rec = {"messages": history + tail, "tools": _schemas(tools, rng, rng.random() < 0.5)}
    return Case(kind, rec, mention)


# -------------------------------------------------------------------------------------------- mixes


def copy_case(rng: random.Random, space: Space) -> Case:
    """A pure in-context copy (the copy warm-up set): echo a sequence of names, numbers, codes and words, look
    a key up in a record, or restate a name given a sentence earlier. A model that cannot copy from its
    context cannot learn the tool-use set (measured: no copying after 222 SFT steps, see the model card);
    this set teaches it in a few hundred short steps."""

    def item() -> str:
        r = rng.random()
        if r < 0.4:
            return space.place(rng)
        if r < 0.6:
            return str(space.value(rng))
        if r < 0.75:
            return space.code(rng)
        if r < 0.9:
            return space.pick(rng, _WORDS)
        return space.word(rng, 1, 3)

    kind = rng.randrange(4)
    if kind <= 1:
        text = " ".join(item() for _ in range(rng.randint(1, 8)))
        question = rng.choice(["Repeat exactly: ", "Copy this: ", "Say back: ", "Echo: "]) + text
        answer = text
    elif kind == 2:
        keys = list(dict.fromkeys(space.word(rng, 1, 2) for _ in range(rng.randint(2, 6))))
        record = {k: item() for k in keys}
        asked = rng.choice(keys)
        question, answer = f"Record: {json.dumps(record)}. What is {asked}?", f"{asked} is {record[asked]}."
    else:
        x = space.place(rng)
        question = rng.choice(
            [f"My city is {x}. Which city is mine?", f"The name is {x}. What is the name?",
             f"Remember {x}. What did I ask you to remember?"]
        )  # fmt: skip
        answer = f"{x}."
    return Case(
        "copy",
        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]},
    )


def copy_set(n: int, seed: int, *_: Any, space: Space = TRAIN) -> list[Case]:
    """The copy warm-up set (train spaces, or another training `Space`): `n` `copy_case`s, deterministic from the seed (same
    arguments as `generate`; the long-example ones do not apply)."""
    rng = random.Random(seed)
    return [copy_case(rng, space) for _ in range(n)]


def drill_case(rng: random.Random, space: Space) -> Case:
    """A one-turn drill of the skills the chat evals test without a tool (recipe v6's second SFT stage): small
    arithmetic 40 %, spelling a name 30 %, counting 15 %, repeating words 15 %, each as the mix asks it
    (`_chat_turn`), with tools offered in a third of them (the answer is still no call). The mix holds
    ~1,000 sums among 2,600 possible ones; the v5 model got "0 + 48" wrong (docs/default-model.md)."""
    r = rng.random()
    if r < 0.4:
        q, a, _ = small_arithmetic(rng)
    else:
        while True:  # the chat turn of the asked kind: spelling, counting or repeating
            q, a, _ = _chat_turn(rng, space)
            if q.startswith("Spell") if r < 0.7 else q.startswith("Count" if r < 0.85 else "Repeat"):
                break
    rec: dict[str, Any] = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if rng.random() < 0.33:
        rec["tools"] = _schemas(_offer(rng, space, [], (1, 3)), rng, calculator=rng.random() < 0.5)
    return Case("drill", rec)


def drill_set(n: int, seed: int, *_: Any, space: Space = TRAIN) -> list[Case]:
    """`n` `drill_case`s, deterministic from the seed (same arguments as `copy_set`)."""
    rng = random.Random(seed)
    return [drill_case(rng, space) for _ in range(n)]


def decide_pair(rng: random.Random, space: Space) -> list[Case]:
    """A call / refusal contrast pair cut after the decision (recipe v9's decision drill): the same lookup
    question with the same other tools, once with the asked topic's tool (→ the call, nothing after it) and
    once without it (→ the refusal). v8's refusal probability told the two halves apart with an AUC of 0.69
    held out (0.83 in its own training space), and it was the likelier reply in 72 % of the held-out pairs
    with the tool offered (`probe_default_model.py decision`). The call's result and answer are what the mix
    already trains, so a pair ends at the decision. Asked tools: get_weather a fifth, else a lookup; a
    two-word topic gets a near-miss tool (one word shared) 60 % of the time; 0-4 other tools."""
    wanted = weather_tool(rng, space) if rng.random() < 0.2 else make_lookup(rng, space, set())
    q, args, *_ = lookup_turn(rng, space, wanted, space.place(rng))
    others = [t for t in _offer(rng, space, [], (0, 4)) if t.topic != wanted.topic]
    if " " in wanted.topic and rng.random() < 0.6:
        others += _near_miss(rng, space, wanted)
    with_tool, head = _pair_head(rng, q, others, wanted)
    # no "I will look that up.": its first token is the refusal's, and the decision is that token
    preface = rng.choice(["", "", "", "Let me check."])
    call = head + [{"role": "assistant", "content": preface, "tool_calls": [_call(wanted.name, args)]}]
    refuse = head + [{"role": "assistant", "content": REFUSAL}]
    calls = {"messages": call, "tools": _schemas(with_tool, rng, rng.random() < 0.2)}
    refusals = {"messages": refuse}
    if others or rng.random() < 0.5:  # no tool at all: the refusal of a bare request, half the time
        refusals["tools"] = _schemas(others, rng, rng.random() < 0.2)
    return [Case("tool_call", calls), Case("refusal", refusals)]


def decide_set(n: int, seed: int, *_: Any, space: Space = TRAIN) -> list[Case]:
    """`n` conversations of `decide_pair`s (the halves of a pair next to each other), deterministic from the
    seed (same arguments as `copy_set`). A pair's refusal is kept 60 % of the time (5 calls to 3 refusals):
    v8 refused held-out lookups whose tool it was offered far more often than it called unoffered ones."""
    rng = random.Random(seed)
    out: list[Case] = []
    while len(out) < n:
        call, refusal = decide_pair(rng, space)
        out += [call, refusal] if rng.random() < 0.6 else [call]
    return out[:n]


MATCH_LISTINGS = ("names", "name-first", "description-first")  # how `match_item` offers its tools


def match_item(
    rng: random.Random, space: Space, topic_first: bool, listing: str = "names"
) -> list[dict[str, str]]:
    """One match-drill conversation: the offered tools, a lookup question, the asked tool's name. `listing`
    says how the tools are offered: "names" ("Tools: a_b, c_d."), or one JSON object per line with the
    name before the description ("name-first", as the chat template lists tools) or after it
    ("description-first": the question's topic then comes before the name that has to be written)."""
    if listing not in MATCH_LISTINGS:
        raise ValueError(f"listing={listing!r}; expected one of {', '.join(MATCH_LISTINGS)}")
    wanted = make_lookup(rng, space, set())
    tools = [wanted] + [make_lookup(rng, space, {wanted.topic}) for _ in range(rng.randint(1, 4))]
    rng.shuffle(tools)
    question = lookup_turn(rng, space, wanted, space.place(rng))[0]
    if topic_first:
        for t in tools:
            t.name = t.topic.replace(" ", "_") + "_" + t.name.split("_", 1)[0]
    if listing == "names":
        offered = "Tools: " + ", ".join(t.name for t in tools) + ". "
    else:
        lines = []
        for t in tools:
            fields = [("name", t.name), ("description", t.desc)]
            if listing == "description-first":
                fields.reverse()
            lines.append(json.dumps({key: value for key, value in fields if value}))  # no empty description
        offered = "Tools:\n" + "\n".join(lines) + "\n"
    return [
        {"role": "user", "content": f"{offered}Which tool answers this? {question}"},
        {"role": "assistant", "content": wanted.name},
    ]


def reverse_item(rng: random.Random, space: Space) -> list[dict[str, str]]:
    """One reverse record look-up: "Record: {"k": "v", ...}. Which key has the value V?" → the key, the word
    *before* the matched value (the backward look-up a verb-first tool name needs), in a short context."""
    keys = list(dict.fromkeys(space.word(rng, 1, 2) for _ in range(rng.randint(2, 6))))
    values = list(dict.fromkeys(space.place(rng) for _ in range(len(keys))))
    record = dict(zip(keys, values))
    asked = rng.choice(list(record))
    question = f"Record: {json.dumps(record)}. Which key has the value {record[asked]}?"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": asked}]


def lookup_case(rng: random.Random, space: Space) -> Case:
    """A backward look-up (recipe v10's look-up warm-up): half reverse record look-ups (`reverse_item`), half
    match drills with verb-first names (`match_item`). Choosing a tool is writing the word *before* the one
    that matches the request (`read_energy_use` for "energy use"); v8 learned the forward copy in its copy
    warm-up but not this, and picked the asked tool in 0.175 of held-out calls, below chance (0.34;
    `probe_default_model.py selection`). 600 steps of either drill on v8 took that to 0.425."""
    messages = reverse_item(rng, space) if rng.random() < 0.5 else match_item(rng, space, False)
    return Case("lookup", {"messages": messages})


def lookup_set(n: int, seed: int, *_: Any, space: Space = TRAIN) -> list[Case]:
    """`n` `lookup_case`s, deterministic from the seed (same arguments as `copy_set`)."""
    rng = random.Random(seed)
    return [lookup_case(rng, space) for _ in range(n)]


def generate(
    n: int, seed: int, long_share: float = 0.03, max_tokens: int = 3000, space: Space = TRAIN
) -> list[Case]:
    """The training mix (train spaces, or another training `Space`): `long_share` long examples
    (agent-sized prompts 70 %, text passkeys 30 %; train spaces), the rest tool use 34 %, calculator 6 %,
    refusal 14 %, chat with tools offered 10 %, plain chat 14 %, code completion 22 %. In the wide3 space
    a tenth of the draws are call / refusal contrast pairs instead (`contrast_pair`; wide5: three tenths)."""
    rng = random.Random(seed)
    functions = stdlib_functions()
    if not functions:
        raise SystemExit("error: found no standard-library functions to make code-completion examples from")
    out: list[Case] = []
    while len(out) < n:
        # 10 % of draws (wide5: 30 %): a call / refusal contrast pair
        if space.contrast and rng.random() < (0.3 if space.varied else 0.1):
            out += contrast_pair(rng, space)
            continue
        r = rng.random()
        if r < long_share:
            if rng.random() < 0.3:
                out.append(passkey_conversation(rng, TRAIN, rng.randint(max_tokens // 8, max_tokens - 60)))
            else:
                # wide5: the long prompts' schemas vary too
                out.append(long_tool_use(rng, space if space.varied else TRAIN, max_tokens))
            continue
        r = rng.random()
        if r < 0.34:
            out.append(tool_use(rng, space))
        elif r < 0.40:
            out.append(calculator_use(rng, space))
        elif r < 0.54:
            out.append(refusal(rng, space, "train"))
        elif r < 0.64:
            out.append(chat(rng, space, True))
        elif r < 0.78:
            out.append(chat(rng, space, False))
        else:
            out.append(Case("code", code_conversation(rng, functions)))
    return out[:n]


def eval_cases(per_kind: int, seed: int) -> list[tuple[str, list, list | None, dict, list[str] | None]]:
    """Held-out cases (held-out spaces, another seed): (kind, messages before the reply, tools, the
    expected reply, must-mention). Each tool conversation gives a tool_call and a tool_answer case."""
    rng = random.Random(seed)
    functions = stdlib_functions()
    convs: list[Case] = []
    convs += [tool_use(rng, HELDOUT) for _ in range(per_kind - per_kind // 5)]
    convs += [calculator_use(rng, HELDOUT) for _ in range(per_kind // 5)]
    convs += [chat(rng, HELDOUT, True) for _ in range(per_kind)]
    convs += [chat(rng, HELDOUT, False) for _ in range(per_kind)]
    convs += [refusal(rng, HELDOUT, "train" if i % 2 else "heldout") for i in range(per_kind)]
    convs += [Case("code", code_conversation(rng, functions)) for _ in range(per_kind)]
    out = []
    for c in convs:
        msgs = c.record["messages"]
        i = next(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        out.append((c.kind, msgs[:i], c.record.get("tools"), msgs[i], c.mention))
        if c.kind == "tool_call":
            j = next(k for k in range(i + 1, len(msgs)) if msgs[k]["role"] == "assistant")
            out.append(("tool_answer", msgs[:j], c.record.get("tools"), msgs[j], c.mention))
    return out


# ---------------------------------------------------------------------------------------------- eval


ATTENTION = "sparse"  # `--attention dense`: never select (an ablation of the LSA indexer)


def _load(model_dir: str):
    from longcat2.model.attention import set_sparse_attention
    from longcat2.model.longcat import LongCatForCausalLM
    from longcat2.tokenizer import load_tokenizer

    model = LongCatForCausalLM.from_pretrained(model_dir).eval()
    set_sparse_attention(model, ATTENTION == "sparse")
    return load_tokenizer(model_dir), model


def _generate(
    model, tok, convs: list[tuple[list, list | None]], max_new_tokens: int, grammar: bool
) -> list[Any]:
    """Greedy replies through the engine, parsed with the chat parser (`grammar`: the server's reply grammar,
    tool_choice auto, constrains each reply)."""
    from longcat2 import chat as chat_template
    from longcat2.engine import Engine, SamplingParams

    prompts = [tok.encode(chat_template.render(m, t, True, False)) for m, t in convs]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0) for _ in convs]
    if grammar:
        from longcat2.engine.grammar import Grammars
        from longcat2.serve.reply_grammar import reply_grammar

        grammars = Grammars(tok.backend.to_str(), model.config.vocab_size, tok.eos_id)
        for p, (_, tools) in zip(params, convs):
            p.grammar = grammars.compile(reply_grammar(tools, "auto", thinking=False))
    engine = Engine(model, max_batch_size=32, eos_token_id=tok.eos_id)
    outs = engine.generate(prompts, params)
    return [chat_template.parse(tok.decode(ids), t) for ids, (_, t) in zip(outs, convs)], sum(map(len, outs))


def score(kind: str, target: dict[str, Any], mention: list[str] | None, got: Any) -> bool:
    if kind == "tool_call":
        want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in target["tool_calls"]]
        return [(c["name"], c["arguments"]) for c in got.tool_calls] == want
    if kind == "tool_answer":
        return not got.tool_calls and all(m in got.content for m in mention or [])
    if kind == "refusal":
        return not got.tool_calls and got.content.strip().startswith(REFUSAL.rstrip("."))
    if kind == "code":
        want_line = target["content"].split("\n")[1] if "\n" in target["content"] else target["content"]
        return got.content.split("\n")[1:2] == [want_line]
    # chat, no_call: the exact reply (the training data answers a greeting with either greeting reply)
    want = GREETING_REPLIES if target["content"] in GREETING_REPLIES else [target["content"]]
    return not got.tool_calls and got.content.strip() in want


README_CASES = {
    "paris_weather": [{"role": "user", "content": "What is the weather in Paris?"}],
    "two_cities": [{"role": "user", "content": "What is the weather in Paris and Oslo?"}],
    # the cases with the README's tool offered: a refusal is due, not a get_weather call
    "joke": [{"role": "user", "content": "Tell me a joke."}],
    "stock_price": [{"role": "user", "content": "What is the stock price of AAPL?"}],
    "translate": [{"role": "user", "content": "Translate 'good morning' into French."}],
}


def evaluate(
    model_dir: str, per_kind: int, seed: int, grammar: bool = False, max_new_tokens: int = 96
) -> dict[str, Any]:
    """Held-out accuracy per kind (see the module docstring) and the README's two examples."""
    tok, model = _load(model_dir)
    cases = eval_cases(per_kind, seed)
    t0 = time.perf_counter()
    weather = [TOOLS["get_weather"]]
    convs = [(m, t) for _, m, t, _, _ in cases] + [(m, weather) for m in README_CASES.values()]
    replies, n_tokens = _generate(model, tok, convs, max_new_tokens, grammar)
    seconds = time.perf_counter() - t0
    scores: dict[str, list[int]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for (kind, msgs, _, target, mention), got in zip(cases, replies):
        ok = score(kind, target, mention, got)
        scores.setdefault(kind, []).append(int(ok))
        ex = examples.setdefault(kind, [])
        if len(ex) < 2 and (not ok or not ex):
            ex.append({"prompt": msgs[-1]["content"][:200], "ok": ok, "reply": got.to_message()})
    readme = {name: {"tool_calls": [{"name": c["name"], "arguments": c["arguments"]} for c in got.tool_calls],
                     "content": got.content} for name, got in zip(README_CASES, replies[len(cases):])}  # fmt: skip
    probe = copy_probe(model, tok, 2 * per_kind, seed) if not grammar else None
    return {
        "model": str(model_dir),
        "recipe_version_of_evals": RECIPE_VERSION,
        "held_out_seed": seed,
        "held_out_spaces": "syllables, topics, verbs, argument names, units, conditions, number class",
        "grammar": grammar,
        "attention": ATTENTION,
        "cases": len(cases),
        "accuracy": {k: round(sum(v) / len(v), 4) for k, v in sorted(scores.items())},
        "counts": {k: len(v) for k, v in sorted(scores.items())},
        "readme": readme,
        "generated_tokens": n_tokens,
        "generation_seconds": round(seconds, 2),
        "examples": examples,
        **({"copy_probe": probe} if probe else {}),
    }


COPY_PROMPTS = ["Repeat exactly: {x}", "My city is {x}. Which city is mine?"]


def copy_probe(model, tok, n: int, seed: int) -> dict[str, float]:
    """Bare copying of one name, per name space (`n` names each, half per prompt of `COPY_PROMPTS`): the
    reply, less a final period, must be the name. "train": training-syllable names; "heldout": held-out
    syllables (never a training name); "open": random letters as in the open training space. Where tool_call
    fails on names, this says whether the model cannot copy them at all (docs/default-model.md)."""
    rng = random.Random(seed + 1)
    spaces = {"train": TRAIN, "heldout": HELDOUT, "open": OPEN}
    names = {k: [sp.place(rng) for _ in range(n)] for k, sp in spaces.items()}
    convs = [
        ([{"role": "user", "content": COPY_PROMPTS[i % 2].format(x=x)}], None)
        for k in spaces
        for i, x in enumerate(names[k])
    ]
    replies, _ = _generate(model, tok, convs, 32, grammar=False)
    out = {}
    for j, k in enumerate(spaces):  # the replies come in the order of `convs`: n per space
        got = replies[j * n : (j + 1) * n]
        out[k] = round(sum(g.content.strip().removesuffix(".") == x for g, x in zip(got, names[k])) / n, 4)
    return out


def passkey(model_dir: str, lengths: list[int], per_length: int, seed: int) -> dict[str, Any]:
    """Text passkey retrieval through the engine (greedy; sparse attention as served), at depths spread
    over the context: the fraction of replies that contain the key."""
    tok, model = _load(model_dir)
    rng = random.Random(seed)
    out: dict[str, Any] = {"model": str(model_dir), "seed": seed, "accuracy": {}, "prompt_tokens": {}}
    for length in lengths:
        cases = [
            passkey_conversation(rng, HELDOUT, length - 40, (i + 0.5) / per_length) for i in range(per_length)
        ]
        convs = [(c.record["messages"][:1], None) for c in cases]
        replies, _ = _generate(model, tok, convs, 16, False)
        out["prompt_tokens"][str(length)] = len(tok.encode(cases[0].record["messages"][0]["content"]))
        out["accuracy"][str(length)] = round(
            sum(c.mention[0] in r.content for c, r in zip(cases, replies)) / len(cases), 4
        )
    return out


# ---------------------------------------------------------------------------------------------- main


def write(path: Path, cases: list[Case]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for c in cases:
            f.write(json.dumps(c.record, ensure_ascii=False, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output .jsonl")
    ap.add_argument("--n", type=int, default=12000, help="conversations (default 12000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0; evals default 777)")
    ap.add_argument("--long-share", type=float, default=0.03, help="share of long examples (default 0.03)")
    ap.add_argument("--max-tokens", type=int, default=3000, help="rough size bound of a long example")
    ap.add_argument("--val-out", default=None, help="also write a validation .jsonl (another seed)")
    ap.add_argument("--val-n", type=int, default=300, help="validation conversations (default 300)")
    ap.add_argument("--copy-set", action="store_true", help="write the copy warm-up set instead of the mix")
    ap.add_argument(
        "--drill-set",
        action="store_true",
        help="write the drill set (arithmetic, spelling, counting, repeating)",
    )
    ap.add_argument(
        "--decide-set",
        action="store_true",
        help="write the decision drill: call / refusal contrast pairs cut after the decision",
    )
    ap.add_argument(
        "--lookup-set",
        action="store_true",
        help="write the look-up warm-up: reverse record look-ups and tool-name match drills",
    )
    ap.add_argument("--space", choices=["train", "open", "open2", "wide", "wide2", "wide3", "wide4", "wide5"],
                    default="train",
                    help="names: training syllables (default) | open: random letters (generic copying) | "
                         "wide: random letters and the stdlib lexicon for every table | wide2: wide with "
                         "snake_case argument names, the README's weather schema, more unoffered lookups | "
                         "wide3: wide2 with one-word argument names and call/refusal contrast pairs | "
                         "open2 / wide4: open / wide3 with half the names made of lexicon-word pieces | "
                         "wide5: wide4 with varied schema surfaces and three times the contrast pairs")  # fmt: skip
    ap.add_argument("--eval-model", metavar="DIR", help="instead: held-out evals of a model, JSON")
    ap.add_argument("--grammar", action="store_true", help="with --eval-model: grammar-constrained replies")
    ap.add_argument("--per-kind", type=int, default=40, help="with --eval-model: conversations per kind")
    ap.add_argument("--passkey-model", metavar="DIR", help="instead: text passkey retrieval of a model, JSON")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], help="passkey context lengths")
    ap.add_argument("--per-length", type=int, default=4, help="passkey cases per length")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for evals (default 1)")
    ap.add_argument("--attention", choices=["sparse", "dense"], default="sparse",
                    help="evals: sparse as served (default) | dense: never select (ablation)")  # fmt: skip
    args = ap.parse_args(argv)
    global ATTENTION
    ATTENTION = args.attention
    if args.eval_model or args.passkey_model:
        import torch

        torch.set_num_threads(args.threads)
    if args.eval_model or args.passkey_model:
        seed = args.seed or 777
        if args.eval_model:
            result = evaluate(args.eval_model, args.per_kind, seed, grammar=args.grammar)
        else:
            result = passkey(args.passkey_model, args.lengths, args.per_length, seed)
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    if not args.out:
        ap.error("--out is required (or --eval-model / --passkey-model DIR)")
    sets = [
        (args.copy_set, copy_set),
        (args.drill_set, drill_set),
        (args.decide_set, decide_set),
        (args.lookup_set, lookup_set),
    ]
    make = partial(next((f for chosen, f in sets if chosen), generate), space=Space(args.space))
    cases = make(args.n, args.seed, args.long_share, args.max_tokens)
    write(Path(args.out), cases)
    kinds: dict[str, int] = {}
    for c in cases:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    print(f"wrote {len(cases)} conversations to {args.out} ({dict(sorted(kinds.items()))})")
    if args.val_out:
        write(Path(args.val_out), make(args.val_n, args.seed + 1_000_003, args.long_share, args.max_tokens))
        print(f"wrote {args.val_n} validation conversations to {args.val_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
