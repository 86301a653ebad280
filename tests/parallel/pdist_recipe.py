"""One tiny training recipe shared by the single-process reference, the spawned ranks and the torchrun script.

Mirrors the trainer's step: CE + MTP loss, backward, global-norm clipping, MuonAdamW (AdamW if the trainer's
optimizer module is missing), then the expert-bias update from routing counts summed over all ranks.
Each rank trains on its contiguous slice of the same global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from longcat2 import parallel as P
from longcat2.config import ModelConfig
from longcat2.model import LongCatForCausalLM

GLOBAL_BATCH, SEQ = 4, 16
LR = 3e-3


def make_cfg(preset: str = "tiny-flash") -> ModelConfig:
    return ModelConfig.from_preset(preset, torch_dtype="float32", vocab_size=256, num_layers=1)


def make_model(preset: str = "tiny-flash", seed: int = 0) -> LongCatForCausalLM:
    torch.manual_seed(seed)
    return LongCatForCausalLM(make_cfg(preset)).train()


def batches(n: int, seed: int = 1, vocab: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(n)]


def probe(vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randint(4, vocab, (2, SEQ), generator=g)


def _fp32_newton_schulz(optim: Any) -> None:
    """Run Muon's Newton–Schulz in fp32 (the optimizer uses bf16): parity to 1e-5 is an fp32 property.

    In bf16 the sharded and the single-process iteration round differently (the Frobenius norm is summed
    over shards) and the runs drift apart by ~1e-4 relative after a few steps: expected, not a bug.
    """
    ns = optim.newton_schulz
    if getattr(ns, "_fp32", False):
        return

    def newton_schulz(g, steps=5, eps=1e-7, dtype=None):
        return ns(g, steps=steps, eps=eps, dtype=torch.float32)

    newton_schulz._fp32 = True  # type: ignore[attr-defined]
    optim.newton_schulz = newton_schulz


def make_optimizer(model: torch.nn.Module, kind: str = "muon") -> torch.optim.Optimizer:
    """The trainer's MuonAdamW (fp32 Newton–Schulz), or plain AdamW (`kind="adamw"`, or no optim.py)."""
    try:
        from longcat2.train import optim
    except ImportError:  # the trainer's optimizer is not there yet
        kind = "adamw"
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    _fp32_newton_schulz(optim)
    return optim.MuonAdamW(optim.param_groups_for(model, LR, weight_decay=0.1))


class BiasUpdate:
    """The trainer's expert-bias control (balance.py), with counts summed over all ranks."""

    def __init__(self, model: torch.nn.Module) -> None:
        from longcat2.train import balance

        self.moes = balance.moe_layers(model)
        self.stats = balance.RoutingStats.for_model(self.moes)
        self.ctl = balance.BudgetController(target=2.0, rate=0.05)

    def record(self) -> None:
        self.stats.record(self.moes)

    def apply(self) -> None:
        P.all_reduce_sum(self.stats.counts)
        t = torch.tensor([float(self.stats.tokens), self.stats.entropy_sum], dtype=torch.float64)
        P.all_reduce_sum(t)
        self.stats.tokens, self.stats.entropy_sum = int(t[0]), float(t[1])
        self.ctl.update(self.moes, self.stats)
        self.stats.reset()


def loss_fn(model: torch.nn.Module, seq: torch.Tensor) -> torch.Tensor:
    x, y = seq[:, :-1], seq[:, 1:]
    out = model(x, return_dict=True, with_mtp=True)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
    mtp = [
        F.cross_entropy(lg.float().flatten(0, 1), y[:, k:].flatten())
        for k, lg in enumerate(out.mtp_logits, 1)
    ]
    return ce + 0.1 * torch.stack(mtp).mean() if mtp else ce


def local_slice(seq: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    b = seq.shape[0] // world
    return seq[rank * b : (rank + 1) * b]


def train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: list[torch.Tensor],
    rank: int = 0,
    world: int = 1,
    bias: BiasUpdate | None = None,
    on_step: Any = None,
) -> list[float]:
    """Run len(data) steps; returns the global mean loss of each step (as the trainer logs it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for i, seq in enumerate(data):
        loss = loss_fn(model, local_slice(seq, rank, world))
        if bias is not None:
            bias.record()
        loss.backward()
        P.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bias is not None:
            bias.apply()
        t = P.all_reduce_sum(loss.detach().double().reshape(1))
        losses.append(float(t) / world)
        if on_step is not None:
            on_step(i + 1)
    return losses


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(x).float().cpu()
    model.train(was)
    return out


def reference(n_steps: int, preset: str = "tiny-flash", optimizer: str = "muon") -> dict[str, Any]:
    """Single process, whole global batch."""
    torch.set_num_threads(1)
    model = make_model(preset)
    opt = make_optimizer(model, optimizer)
    bias = BiasUpdate(model)
    data = batches(n_steps)
    return {"losses": train(model, opt, data, bias=bias), "model": model, "opt": opt}
