"""Sampling parameters and per-request samplers.

Design choices:
- `SamplingParams` follows the OpenAI/vLLM vocabulary (temperature, top_k, top_p, min_p, repetition /
  presence / frequency penalties, seed, stop token ids, stop strings, max_new_tokens) so the API server can
  pass requests through unchanged. temperature below `GREEDY_TEMPERATURE` (1e-5, vLLM's threshold; 0
  included) or top_k == 1 means greedy: that is the limit of sampling as the temperature goes to 0, and
  dividing logits by a temperature such as 1e-45 would overflow them to inf and the probabilities to NaN.
- No validated parameter may produce NaN probabilities: processed logits are clamped to the finite fp32
  range (an extreme repetition penalty such as 1e-300 overflows them to ±inf), and top-p always keeps the
  most likely token (top_p: 1e-300 then means greedy). NaN logits from the model itself still raise in
  `torch.multinomial`; the engine fails that request alone.
- `logit_bias` ({token id: bias}, OpenAI semantics) is added to the logits before everything else, so it
  also steers greedy decoding (-100 effectively bans a token, +100 forces it).
- Order of logit processing: logit bias → penalties (repetition on prompt + output tokens, HF/vLLM rule: positive logits
  divided, negative multiplied; presence and frequency on output tokens only) → the grammar mask (after
  the penalties, so a penalty can never make a masked -inf NaN) → temperature → top-k →
  top-p (smallest set whose mass reaches p, the top token always kept) → min-p (drop tokens below min_p ×
  the top probability). Greedy takes the argmax after penalties.
- Every request owns a `torch.Generator` seeded from `seed` (or from a fresh random seed), so a request's
  samples do not depend on which other requests share its batch. Sampling is `torch.multinomial` with that
  generator; speculative verification draws its uniforms from the same generator.
- Constrained decoding: `grammar` (a `longcat2.engine.grammar.Constraint`) sets the logits of tokens the
  grammar does not allow to -inf before anything else, and is advanced by every kept token (`observe`).
- Speculative sampling (Leviathan et al.): accept draft x with probability min(1, p(x)/q(x)), else sample
  from normalise(max(p - q, 0)); the emitted tokens then follow the target distribution exactly. Greedy
  acceptance is "draft == argmax".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily
_FP32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings; need the engine's detokenize callback
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    grammar: Any = None  # a longcat2.engine.grammar.Constraint (one per request), or None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{key}: {msg}")

        need(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        need(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        need(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        need(all(math.isfinite(b) for b in self.logit_bias.values()), "logit_bias", "biases must be finite")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class RequestSampler:
    """Holds a request's generator and the token statistics its penalties need."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.counts: torch.Tensor | None = None  # output token counts [V] (penalties only)
        self.seen: torch.Tensor | None = None  # prompt or output token present [V] (repetition penalty)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids [B], biases [B])
        if params.logit_bias:
            ids, vals = zip(*sorted(params.logit_bias.items()))
            self.bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(vals, dtype=torch.float32))
        self.constraint = params.grammar
        self.allowed: torch.Tensor | None = None  # [V] bool, prepared by grammar.fill_masks for one step
        if params.uses_penalties:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt:
                self.seen[torch.tensor(prompt)] = True

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no logit processing: the token is the argmax of the raw logits (the engine takes
        these rows' argmax in one batched call)."""
        return self.params.greedy and self.bias is None and self.counts is None and self.constraint is None

    # ------------------------------------------------------------------ state
    def observe(self, token: int) -> None:
        if self.constraint is not None:
            self.constraint.accept(token)
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True  # type: ignore[index]

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.counts is None else (self.counts.clone(), self.seen.clone())  # type: ignore[union-attr]

    def restore(self, snap: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if snap is not None:
            self.counts, self.seen = snap[0].clone(), snap[1].clone()

    # ------------------------------------------------------------------ distributions
    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] → penalised fp32 logits [V]."""
        x = logits.float()
        p = self.params
        if self.bias is not None:
            x = x.index_add(0, self.bias[0].to(x.device), self.bias[1].to(x.device))
        if self.counts is not None:
            if p.repetition_penalty != 1.0:
                pen = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
                x = torch.where(self.seen, pen, x)  # type: ignore[arg-type]
            if p.frequency_penalty:
                x = x - p.frequency_penalty * self.counts
            if p.presence_penalty:
                x = x - p.presence_penalty * (self.counts > 0).float()
            x = x.clamp(-_FP32_MAX, _FP32_MAX)
        if self.constraint is not None:  # last: a penalty must not turn the mask's -inf into NaN (-inf * 0)
            allowed = self.allowed if self.allowed is not None else self.constraint.mask()
            self.allowed = None
            if allowed is not None:
                x = x.masked_fill(~allowed.to(x.device, non_blocking=True), float("-inf"))  # masks are on CPU
        return x

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] → the sampling distribution [V] (fp32); one-hot under greedy."""
        x = self.process(logits)
        p = self.params
        if p.greedy:
            return torch.nn.functional.one_hot(x.argmax(), x.shape[-1]).float()
        x = (x / p.temperature).clamp(-_FP32_MAX, _FP32_MAX)
        if p.top_k and p.top_k < x.shape[-1]:
            kth = x.topk(p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            cum = sp.cumsum(-1)
            drop = (cum - sp) >= p.top_p  # mass before this token already reaches top_p
            drop[0] = False  # the most likely token always stays (top_p below fp32's resolution)
            probs = probs.scatter(0, si, sp.masked_fill(drop, 0.0))
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs / probs.sum()

    def sample(self, logits: torch.Tensor) -> int:
        if self.params.greedy:
            return int(self.process(logits).argmax())
        return int(torch.multinomial(self.probs(logits), 1, generator=self.generator))

    def sample_from(self, probs: torch.Tensor) -> int:
        if self.params.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept_draft(self, target: torch.Tensor, draft: torch.Tensor, token: int) -> bool:
        """Speculative acceptance of `token` drawn from distribution `draft` under `target`."""
        if self.params.greedy:
            return int(target.argmax()) == token
        q = float(draft[token])
        if q <= 0:
            return False
        u = float(torch.rand(1, generator=self.generator))
        return u < min(1.0, float(target[token]) / q)

    def residual(self, target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
        """normalise(max(target - draft, 0)) (falls back to target if that is empty)."""
        if self.params.greedy:
            return target
        r = (target - draft).clamp(min=0)
        s = r.sum()
        return r / s if float(s) > 0 else target
