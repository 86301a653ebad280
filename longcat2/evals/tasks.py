"""Synthetic long-context tasks at token level: passkey, multi-key NIAH, MQAR, variable tracking.

Design choices:
- Token level, not text: every task draws from a small fixed id space (`TaskVocab`) so a tiny model trained
  from scratch can learn it; ids start above the special tokens (0..3) and fit in a 512-token vocabulary.
- One `Example` = token ids, a loss mask that is 1 exactly on answer tokens, and the answer spans. The same
  generator makes training data (`longcat2 prepare --task ...`) and evaluation sets, from a seed: the same
  seed always gives the same examples.
- Exact-match accuracy needs one forward pass: with teacher forcing, "every answer token is the argmax
  given the true prefix" is equivalent to greedy decoding reproducing the answer.
- Needle depth is a fraction of the filler (0 = start, 1 = end), so results form a length × depth grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TASKS = ("passkey", "niah", "mqar", "vt")


@dataclass(frozen=True)
class TaskVocab:
    """Id layout: markers, then 10 digits, then keys, values, variables, filler."""

    base: int = 4  # ids 0..3 are unk/bos/eos/pad
    n_keys: int = 64
    n_values: int = 64
    n_vars: int = 32
    n_filler: int = 64

    @property
    def markers(self) -> dict[str, int]:
        names = ["KEY", "QUERY", "ANSWER", "SEP", "NEEDLE", "ASSIGN", "NEWLINE", "END"]
        return {n: self.base + i for i, n in enumerate(names)}

    @property
    def digit0(self) -> int:
        return self.base + 8

    @property
    def key0(self) -> int:
        return self.digit0 + 10

    @property
    def value0(self) -> int:
        return self.key0 + self.n_keys

    @property
    def var0(self) -> int:
        return self.value0 + self.n_values

    @property
    def filler0(self) -> int:
        return self.var0 + self.n_vars

    @property
    def size(self) -> int:
        return self.filler0 + self.n_filler


@dataclass
class Example:
    tokens: np.ndarray  # int64 [T]
    loss_mask: np.ndarray  # bool [T]: True on answer tokens (predicted from the previous position)
    answers: list[tuple[int, int]] = field(default_factory=list)  # [start, end) spans of answer tokens
    depth: float = 0.0


def _filler(rng: np.random.Generator, vocab: TaskVocab, n: int) -> list[int]:
    return (vocab.filler0 + rng.integers(0, vocab.n_filler, n)).tolist()


def _finish(prefix: list[int], answer: list[int], depth: float, bos: int = 1) -> Example:
    tokens = [bos] + prefix + answer
    mask = np.zeros(len(tokens), dtype=bool)
    start = len(tokens) - len(answer)
    mask[start:] = True
    return Example(np.asarray(tokens, dtype=np.int64), mask, [(start, len(tokens))], depth)


def _blocks(tokens: list[int]) -> list[list[int]]:
    return [[t] for t in tokens]


def _insert(blocks: list[list[int]], depth: float, block: list[int]) -> list[list[int]]:
    """Insert `block` between blocks at fraction `depth`: needles never split each other."""
    at = int(round(depth * len(blocks)))
    return blocks[:at] + [block] + blocks[at:]


def _flat(blocks: list[list[int]]) -> list[int]:
    return [t for b in blocks for t in b]


def passkey(
    rng: np.random.Generator, length: int, depth: float, vocab: TaskVocab, digits: int = 5
) -> Example:
    """Filler with [KEY d1..dn] at `depth`; ends with [QUERY] and the answer d1..dn."""
    m = vocab.markers
    key = (vocab.digit0 + rng.integers(0, 10, digits)).tolist()
    needle = [m["KEY"], *key, m["SEP"]]
    tail = [m["QUERY"]]
    n_fill = max(0, length - 1 - len(needle) - len(tail) - digits)
    return _finish(_flat(_insert(_blocks(_filler(rng, vocab, n_fill)), depth, needle)) + tail, key, depth)


def niah(
    rng: np.random.Generator,
    length: int,
    depth: float,
    vocab: TaskVocab,
    n_needles: int = 4,
    value_len: int = 3,
) -> Example:
    """Multi-key needle in a haystack: n (key → value) needles, the queried one at `depth`, the rest
    (distractors) at random depths; the answer is the queried key's value."""
    m = vocab.markers
    keys = rng.choice(vocab.n_keys, n_needles, replace=False)
    values = [(vocab.value0 + rng.integers(0, vocab.n_values, value_len)).tolist() for _ in keys]
    needles = [[m["NEEDLE"], vocab.key0 + int(k), m["ASSIGN"], *v, m["SEP"]] for k, v in zip(keys, values)]
    tail = [m["QUERY"], vocab.key0 + int(keys[0]), m["ANSWER"]]
    n_fill = max(0, length - 1 - sum(map(len, needles)) - len(tail) - value_len)
    body = _blocks(_filler(rng, vocab, n_fill))
    for needle in needles[1:]:
        body = _insert(body, float(rng.random()), needle)
    return _finish(_flat(_insert(body, depth, needles[0])) + tail, values[0], depth)


def mqar(rng: np.random.Generator, length: int, depth: float, vocab: TaskVocab, n_pairs: int = 16) -> Example:
    """Multi-query associative recall: n (key value) pairs near `depth`, filler, then every key queried
    once in random order, each followed by its value (all values are answers)."""
    keys = rng.choice(vocab.n_keys, n_pairs, replace=False)
    vals = rng.integers(0, vocab.n_values, n_pairs)
    pairs = [t for k, v in zip(keys, vals) for t in (vocab.key0 + int(k), vocab.value0 + int(v))]
    order = rng.permutation(n_pairs)
    n_fill = max(0, length - 1 - 2 * len(pairs) - 1)
    body = _flat(_insert(_blocks(_filler(rng, vocab, n_fill)), depth, pairs)) + [vocab.markers["QUERY"]]
    tokens = [1] + body
    mask = [False] * len(tokens)
    answers = []
    for i in order:
        tokens += [vocab.key0 + int(keys[i]), vocab.value0 + int(vals[i])]
        mask += [False, True]
        answers.append((len(tokens) - 1, len(tokens)))
    return Example(np.asarray(tokens, dtype=np.int64), np.asarray(mask), answers, depth)


def variable_tracking(
    rng: np.random.Generator, length: int, depth: float, vocab: TaskVocab, hops: int = 3, n_chains: int = 2
) -> Example:
    """Chains X1 = v, X2 = X1, ..., Xh = X(h-1) spread from `depth` on, plus distractor chains;
    the query asks for the value of the last variable of the first chain (multi-hop)."""
    m = vocab.markers
    names = rng.choice(vocab.n_vars, hops * n_chains, replace=False).reshape(n_chains, hops)
    chains = []
    for c in range(n_chains):
        v = vocab.value0 + int(rng.integers(0, vocab.n_values))
        stmts = [[vocab.var0 + int(names[c, 0]), m["ASSIGN"], v, m["NEWLINE"]]]
        for h in range(1, hops):
            stmts.append(
                [vocab.var0 + int(names[c, h]), m["ASSIGN"], vocab.var0 + int(names[c, h - 1]), m["NEWLINE"]]
            )
        chains.append((v, stmts))
    tail = [m["QUERY"], vocab.var0 + int(names[0, -1]), m["ANSWER"]]
    n_fill = max(0, length - 1 - 4 * hops * n_chains - len(tail) - 1)
    body = _blocks(_filler(rng, vocab, n_fill))
    # place the queried chain's statements in order between `depth` and the end; distractors anywhere
    spots = sorted(depth + (1 - depth) * rng.random(hops) * 0.9)
    for stmt, d in reversed(list(zip(chains[0][1], spots))):
        body = _insert(body, d, stmt)
    for _, stmts in chains[1:]:
        for stmt, d in reversed(list(zip(stmts, sorted(rng.random(hops))))):
            body = _insert(body, d, stmt)
    return _finish(_flat(body) + tail, [chains[0][0]], depth)


GENERATORS = {"passkey": passkey, "niah": niah, "mqar": mqar, "vt": variable_tracking}


def make_examples(
    task: str,
    n: int,
    length: int,
    seed: int,
    depths: list[float] | None = None,
    vocab: TaskVocab | None = None,
    **kw,
) -> list[Example]:
    """n examples of `task` at `length` tokens; depths cycle through `depths` (default: uniform random)."""
    if task not in GENERATORS:
        raise ValueError(f"task: unknown task {task!r}; known: {', '.join(TASKS)}")
    vocab = vocab or TaskVocab()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        depth = depths[i % len(depths)] if depths else float(rng.random())
        out.append(GENERATORS[task](rng, length, depth, vocab, **kw))
    return out
