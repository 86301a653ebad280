"""Constrained decoding: a grammar (llguidance) masks each constrained request's logits to the tokens that
keep its output inside the grammar.

Design choices:
- Engine: llguidance (`LLMatcher`, Lark grammars with inline `%json` schemas, special tokens named `<tag>`,
  lexeme negation `~`). It has no runtime dependencies (xgrammar needs transformers and triton), builds its
  token trie straight from a HF `tokenizers` JSON, and computes masks in Rust without holding the GIL.
- `Grammars` is built once per tokenizer (the trie is the expensive part) and compiles one `Constraint`
  per request. A `Constraint` travels in `SamplingParams.grammar`; the request's sampler masks its logits
  with it and feeds it every token the request keeps (`RequestSampler.observe`).
- Batched masks: before sampling, `Engine.step` calls `fill_masks` with the samplers about to sample; the
  masks of all constrained rows are computed in one parallel llguidance call into one [B, V/32] int32
  bitmask and unpacked to [B, V] booleans with one tensor op. A sampler whose mask was not prepared (a
  caller that samples on its own) computes it on demand.
- A matcher that ends in an error state (it cannot: only allowed tokens are sampled, unless the request
  also has stop strings or `ignore_eos`) stops constraining rather than masking everything; the API layer
  still returns unparseable output as plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

_BITS = torch.arange(32, dtype=torch.int32)  # [32]


class GrammarError(ValueError):
    """A grammar does not compile; the message is llguidance's."""


def new_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 for llguidance to fill (bit j of word i: token 32·i + j allowed)."""
    return torch.zeros(batch, (vocab_size + 31) // 32, dtype=torch.int32)


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 bitmask → [B, V] bool (True = allowed)."""
    return ((bits.unsqueeze(-1) >> _BITS) & 1).bool().flatten(1)[:, :vocab_size]


class Constraint:
    """One request's grammar state."""

    def __init__(self, matcher: Any, vocab_size: int, source: str | None = None) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.source = source  # the Lark text it was compiled from (multi-rank engines recompile it)

    @property
    def active(self) -> bool:
        return not self.matcher.is_error()

    def mask(self) -> torch.Tensor | None:
        """[V] bool of the tokens allowed next; None when the matcher gave up."""
        if not self.active:
            return None
        bits = new_bitmask(1, self.vocab_size)
        self.matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        return unpack_bitmask(bits, self.vocab_size)[0]

    def accept(self, token: int) -> None:
        if self.active:
            self.matcher.consume_token(token)


class Grammars:
    """Compiles grammars for one tokenizer. `tokenizer_json`: the HF `tokenizers` JSON (`tokenizer.json`);
    `vocab_size`: the model's logit width (may exceed the tokenizer's)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int) -> None:
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)

    def compile(self, lark: str) -> Constraint:
        matcher = self._llg.LLMatcher(
            self.tokenizer, self._llg.LLMatcher.grammar_from_lark(lark), log_level=0
        )
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Constraint(matcher, self.vocab_size, lark)


_executor: Any = None


def fill_masks(samplers: Sequence[Any]) -> None:
    """Prepare `sampler.allowed` ([V] bool) for every sampler with an active constraint, in one batch."""
    rows = [s for s in samplers if s.constraint is not None and s.constraint.active]
    if not rows:
        return
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    vocab = rows[0].constraint.vocab_size
    bits = new_bitmask(len(rows), vocab)  # [B, ceil(V/32)]
    pairs = [(s.constraint.matcher, i) for i, s in enumerate(rows)]
    _executor.unsafe_compute_mask_ptr(pairs, bits.data_ptr(), bits.shape[1] * 4, len(rows))
    allowed = unpack_bitmask(bits, vocab)  # [B, V]
    for s, row in zip(rows, allowed):
        s.allowed = row
