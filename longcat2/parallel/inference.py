"""Tensor + expert parallel inference, applied from outside to the model's own modules.

    layout = init_inference(tp=2, ep=2)                   # process group (gloo on CPU) + the two groups
    model = build_model(); parallelize_for_inference(model, layout)
    engine = Engine(model, ...)                           # the same engine, on every rank (see lockstep.py)

Design choices:
- No second model. Parallelism replaces parameters by this rank's slices, sets `MLA.num_heads` to the
  local head count, swaps three leaf modules (vocab-parallel embedding, vocab-parallel LM head, the routed
  experts) and adds forward hooks that all-reduce the outputs of row-parallel linears. The decoder, the MLA
  math, the engine's paged cache and kernels are untouched: they read `num_heads` and weight shapes, so
  they run on the local heads as they would on a smaller model.
- Layout. `world = tp × ep` ranks form a 2-D grid ("ep", "tp"): the tp group is `tp` neighbouring ranks,
  the ep group the ranks with the same tp index (every rank holds a distinct (head slice, expert slice)).
  `tp == ep == world` (the reference deployment, TP16 + EP16 on 16 chips) puts both on the same ranks.
  Every rank runs the same batch; after each all-reduce all ranks hold the same activations.
- MLA: heads split. q_b_proj and kv_b_proj are column-parallel (their output rows are head-major, so a head
  block is one contiguous row range), o_proj row-parallel (the matching column range) + all-reduce. The
  latent cache (c_kv, k_rope) and the indexer key cache stay replicated: the latent is shared by all heads
  (that is MLA's point: a head's absorbed query needs the whole latent), so splitting heads cannot split
  it; q_a_proj / kv_a_proj_with_mqa (producing the shared latents) are replicated too.
- Indexer: replicated. Splitting its heads would all-reduce a [T, S] score partial per owner sublayer
  before top-k (S = every cached key: at 1M context that is far more traffic than the heads' output),
  and partial sums in another order move ties at the top-k boundary, so selections (and tokens) would no
  longer match one process. Replicated, every rank computes the exact single-process selection; the cost is
  the indexer's weights on every rank (longcat-2.0: wq_b + wk + weights_proj ≈ 0.2 GB bf16 per owner
  sublayer... see docs/distributed.md for the measured bytes).
- Dense FFNs (mlps.*, the MTP feed-forward): gate/up column-parallel, down row-parallel + all-reduce.
- Vocabulary-parallel: embed_tokens (main and MTP), every N-gram table, lm_head. Rows are split in
  `tp` near-equal contiguous ranges (tables have arbitrary row counts). An embedding looks up the ids in
  its range (zeros elsewhere) and all-reduces; the LM head computes its logit columns and all-gathers them
  (padded to equal size, gloo needs that). Both are exact: a sum with zeros, a concatenation.
- Experts: routed experts split over the ep group in contiguous blocks. The MoE's sorted rows are the same
  on every rank (replicated batch), so there is no all-to-all: a rank runs its experts on their (contiguous)
  rows, leaves zeros elsewhere, and the ep group all-reduces the [M, H] result (exact: one non-zero term
  per row). Zero-computation experts are evaluated by the MoE itself (Σ gate · x) and never enter the
  experts module: they never leave their rank. The router, norms, eh_proj are replicated.
- Collectives are hand-written (`dist.all_reduce` / `all_gather` in hooks and three small modules), not
  DTensor `parallelize_module`: the engine's kernels read weights directly (absorbed MLA views kv_b_proj's
  weight per head), which must stay plain local tensors, and inference needs no autograd through
  redistributions. Parameters keep their names, so the HF key map of `longcat2.hf_checkpoint` applies
  unchanged and `shard_specs` (name → dim, start, stop of the full tensor) tells a loader which slice of
  each tensor this rank reads (`parallel/loading.py`).
- Works on a real or a meta model (on meta only shapes change; the loader fills the slices).
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longcat2.model.attention import MLA
from longcat2.model.layers import SwiGLU
from longcat2.model.moe import Experts, MoE, linear_by_expert
from longcat2.parallel.mesh import ParallelConfigError, backend_for, default_device, env_rank_world

ShardSpec = tuple[int, int, int]  # (dim, start, stop) of the full tensor that a rank holds


@dataclass
class InferenceLayout:
    """Where this rank sits: its tensor-parallel and expert-parallel groups and indices."""

    rank: int = 0
    world_size: int = 1
    tp: int = 1
    ep: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp if self.tp * self.ep == self.world_size else self.rank

    @property
    def ep_rank(self) -> int:
        if self.tp == self.ep == self.world_size and self.world_size > 1:
            return self.rank
        return self.rank // self.tp

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def validate_layout(world_size: int, tp: int, ep: int) -> None:
    """Raise ParallelConfigError naming the field when tp / ep do not fit the world size."""
    for name, v in (("tp", tp), ("ep", ep)):
        if not isinstance(v, int) or v < 1:
            raise ParallelConfigError(f"{name}: must be an integer >= 1, got {v!r}")
    if tp * ep == world_size or (tp == ep == world_size):
        return
    raise ParallelConfigError(
        f"tp, ep: tp × ep ({tp} × {ep}) must equal the number of processes ({world_size}), or tp = ep = "
        f"the number of processes (both over the same ranks, as TP16 + EP16 on 16 chips)"
    )


def validate_model(cfg, tp: int, ep: int) -> None:
    """Raise ParallelConfigError naming the config field a degree does not divide."""
    checks = [
        ("num_attention_heads", cfg.num_attention_heads, tp),
        ("ffn_hidden_size", cfg.ffn_hidden_size, tp),
    ]
    checks.append(("n_routed_experts", cfg.n_routed_experts, ep))
    for key, n, d in checks:
        if d > 1 and n % d:
            raise ParallelConfigError(f"{key}: {n} cannot be split evenly over {d} ranks")


def init_inference(
    tp: int = 1, ep: int = 1, device: str | torch.device | None = None, timeout_s: float | None = None
) -> InferenceLayout:
    """Create the process group (under torchrun) and the tp / ep groups. A single process: no group.
    `timeout_s` bounds collectives; a server waits for requests inside one, so it passes a long one."""
    rank, world, local = env_rank_world()
    validate_layout(world, tp, ep)
    dev = default_device(local, device)
    if dev.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.set_device_index(dev.index or 0)
    if world == 1:
        return InferenceLayout(device=dev)
    if not dist.is_initialized():
        kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend=backend_for(dev), **kw)
        rank = dist.get_rank()
    ranks = list(range(world))
    if tp == ep == world:
        tp_groups = ep_groups = [ranks]
    else:  # grid ("ep", "tp"): tp = neighbours, ep = same tp index
        tp_groups = [ranks[i : i + tp] for i in range(0, world, tp)]
        ep_groups = [ranks[j::tp] for j in range(tp)]
    made: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for members in tp_groups + ep_groups:  # every rank creates every group, in the same order
        key = tuple(members)
        if key not in made:
            made[key] = dist.new_group(members) if len(members) < world else dist.group.WORLD
    tp_group = made[tuple(next(g for g in tp_groups if rank in g))]
    ep_group = made[tuple(next(g for g in ep_groups if rank in g))]
    return InferenceLayout(rank, world, tp, ep, dev, tp_group, ep_group)


# ---------------------------------------------------------------------- sharded modules
def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    dist.all_reduce(t, group=group)
    return t


def _reduce_output_hook(group: dist.ProcessGroup, module: nn.Module, inputs, output: torch.Tensor):
    return _all_reduce(output, group)


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous near-equal split of n items into `parts`: the [start, stop) of part `index`."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, stop) of an embedding table of `num_embeddings` rows; output all-reduced."""

    def __init__(
        self, weight: torch.Tensor, num_embeddings: int, start: int, group: dist.ProcessGroup
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.num_embeddings, self.start, self.stop = num_embeddings, start, start + weight.shape[0]
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.stop)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)  # [..., d]
        return _all_reduce(out, self.group)


class VocabParallelHead(nn.Module):
    """This rank's output rows of the LM head; logits all-gathered to the full vocabulary."""

    def __init__(self, weight: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.sizes, self.group = sizes, group
        self.out_features = sum(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)  # [..., V_local]
        width = max(self.sizes)
        if local.shape[-1] < width:
            local = F.pad(local, (0, width - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in self.sizes]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, self.sizes)], dim=-1)  # [..., V]


class ExpertShard(nn.Module):
    """Routed experts [lo, hi) of `num_experts`; same call as `Experts` (rows sorted by expert id, the same
    on every rank), results all-reduced over the ep group. No all-to-all: the batch is replicated."""

    def __init__(self, experts: Experts, lo: int, hi: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.num_experts, self.lo, self.hi, self.group = experts.num_experts, lo, hi, group
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, nn.Parameter(_narrow(getattr(experts, name), 0, lo, hi), requires_grad=False))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, H] grouped by expert (counts [E]) → [M, H] (every expert's rows, after the reduce)."""
        bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        start, stop = int(bounds[self.lo]), int(bounds[self.hi])  # this rank's rows are contiguous
        out = x_sorted.new_zeros(x_sorted.shape)
        if stop > start:
            x, c = x_sorted[start:stop], counts[self.lo : self.hi]
            offs = c.cumsum(0).to(torch.int32)
            g = linear_by_expert(x, self.gate_proj, c, offs)
            u = linear_by_expert(x, self.up_proj, c, offs)
            out[start:stop] = linear_by_expert(F.silu(g) * u, self.down_proj, c, offs)
        return _all_reduce(out, self.group)


# ---------------------------------------------------------------------- applying it
def _narrow(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    if t.is_meta:
        shape = list(t.shape)
        shape[dim] = stop - start
        return torch.empty(shape, dtype=t.dtype, device="meta")
    return t.detach().narrow(dim, start, stop - start).clone()


class _Sharder:
    def __init__(self, model: nn.Module, layout: InferenceLayout) -> None:
        self.model, self.layout = model, layout
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.specs: dict[str, ShardSpec] = {}

    def param(self, module: nn.Module, attr: str, dim: int, start: int, stop: int) -> None:
        old = getattr(module, attr)
        self.specs[self.names[id(old)]] = (dim, start, stop)
        setattr(module, attr, nn.Parameter(_narrow(old, dim, start, stop), requires_grad=False))

    def heads(self, mla: MLA) -> None:
        tp, r = self.layout.tp, self.layout.tp_rank
        h = mla.num_heads
        lo, hi = split_range(h, tp, r)
        qk, kv = mla.nope + mla.rope, mla.nope + mla.v_dim
        self.param(mla.q_b_proj, "weight", 0, lo * qk, hi * qk)
        self.param(mla.kv_b_proj, "weight", 0, lo * kv, hi * kv)
        self.param(mla.o_proj, "weight", 1, lo * mla.v_dim, hi * mla.v_dim)
        mla.num_heads = hi - lo
        mla.o_proj.register_forward_hook(functools.partial(_reduce_output_hook, self.layout.tp_group))

    def ffn(self, mlp: SwiGLU) -> None:
        lo, hi = split_range(mlp.gate_proj.weight.shape[0], self.layout.tp, self.layout.tp_rank)
        self.param(mlp.gate_proj, "weight", 0, lo, hi)
        self.param(mlp.up_proj, "weight", 0, lo, hi)
        self.param(mlp.down_proj, "weight", 1, lo, hi)
        mlp.down_proj.register_forward_hook(functools.partial(_reduce_output_hook, self.layout.tp_group))

    def embedding(self, parent: nn.Module, attr: str) -> None:
        emb = getattr(parent, attr)
        n = emb.weight.shape[0]
        lo, hi = split_range(n, self.layout.tp, self.layout.tp_rank)
        self.specs[self.names[id(emb.weight)]] = (0, lo, hi)
        new = VocabParallelEmbedding(_narrow(emb.weight, 0, lo, hi), n, lo, self.layout.tp_group)
        setattr(parent, attr, new)

    def head(self, parent: nn.Module, attr: str) -> None:
        lin = getattr(parent, attr)
        n, tp = lin.weight.shape[0], self.layout.tp
        lo, hi = split_range(n, tp, self.layout.tp_rank)
        sizes = [b - a for a, b in (split_range(n, tp, i) for i in range(tp))]
        self.specs[self.names[id(lin.weight)]] = (0, lo, hi)
        setattr(parent, attr, VocabParallelHead(_narrow(lin.weight, 0, lo, hi), sizes, self.layout.tp_group))

    def experts(self, moe: MoE) -> None:
        e = moe.experts.num_experts
        lo, hi = split_range(e, self.layout.ep, self.layout.ep_rank)
        for name in ("gate_proj", "up_proj", "down_proj"):
            self.specs[self.names[id(getattr(moe.experts, name))]] = (0, lo, hi)
        moe.experts = ExpertShard(moe.experts, lo, hi, self.layout.ep_group)


def parallelize_for_inference(model: nn.Module, layout: InferenceLayout) -> nn.Module:
    """Shard `model` (a LongCatForCausalLM, real or on meta) in place for this rank; returns it.
    `model.shard_specs` maps each sharded parameter's name to the (dim, start, stop) slice held here."""
    cfg = model.config
    validate_model(cfg, layout.tp, layout.ep)
    model.shard_specs = {}
    if not layout.distributed:
        return model
    if cfg.tie_word_embeddings and layout.tp > 1:
        raise ParallelConfigError("tie_word_embeddings: tied embeddings are not supported with tp > 1")
    s = _Sharder(model, layout)
    inner = model.model
    if layout.tp > 1:
        for module in model.modules():
            if isinstance(module, MLA):
                s.heads(module)
            elif isinstance(module, SwiGLU):
                s.ffn(module)
        s.embedding(inner, "embed_tokens")
        if inner.mtp is not None:
            s.embedding(inner.mtp, "embed_tokens")
        if inner.ngram_embeddings is not None:
            tables = inner.ngram_embeddings.embedders
            for i in range(len(tables)):
                s.embedding(tables, str(i))
        s.head(model, "lm_head")
    if layout.ep > 1:
        for module in model.modules():
            if isinstance(module, MoE):
                s.experts(module)
    model.shard_specs = s.specs
    return model


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Resident parameter bytes of this rank: total, the sharded and replicated parts, and the float8
    weights with their block scales (`model/fp8.py`)."""
    specs = getattr(model, "shard_specs", {})
    out = dict.fromkeys(("total", "sharded", "replicated", "float8", "float8_scales"), 0)
    for name, p in model.named_parameters():
        b = p.numel() * p.element_size()
        out["total"] += b
        out["sharded" if name in specs else "replicated"] += b
        if p.dtype == torch.float8_e4m3fn:
            out["float8"] += b
        elif name.endswith("_scale_inv"):
            out["float8_scales"] += b
    return out
