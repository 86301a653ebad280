"""Hardware descriptions, parallel layouts, and the training / serving cost models.

See the package docstring (`longcat2.plan`) for the design choices and docs/planning.md for the assumptions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat2.config import ModelConfig

from . import model_math as mm

HARDWARE_DIR = Path(__file__).resolve().parent.parent / "hardware"
HARDWARE_ALIASES = {"h100": "h100-sxm", "910c": "ascend-910c-cm384", "ascend-910c": "ascend-910c-cm384",
                    "cm384": "ascend-910c-cm384", "cpu": "cpu-this-machine"}  # fmt: skip
RECOMPUTE = ("none", "selective", "full")


class PlanError(ValueError):
    """An invalid layout, workload or hardware file; the message starts with the offending field."""


# ---------------------------------------------------------------------- hardware
@dataclass
class Hardware:
    name: str
    bf16_flops: float  # dense peak FLOP/s per chip
    hbm_bytes: float
    hbm_bw: float  # bytes/s per chip
    scaleup_bw: float  # bytes/s per chip per direction inside the scale-up domain (NVLink, UB)
    scaleout_bw: float  # bytes/s per chip per direction between domains (IB / RoCE)
    chips_per_node: int
    scaleup_domain: int = 0  # chips sharing the scale-up fabric; 0 → chips_per_node
    fp8_flops: float | None = None  # None: no FP8 tensor cores (FP8 runs at the BF16 rate)
    host_bw: float = 50e9  # bytes/s per chip to host memory (optimizer offload); PCIe Gen5 x16 ≈ 50-60 GB/s
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.scaleup_domain:
            self.scaleup_domain = self.chips_per_node
        for key in ("bf16_flops", "hbm_bytes", "hbm_bw", "scaleup_bw", "scaleout_bw", "chips_per_node"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise PlanError(f"hardware.{key}: must be a positive number, got {v!r}")

    def peak(self, precision: str) -> float:
        return (self.fp8_flops or self.bf16_flops) if precision == "fp8" else self.bf16_flops


def list_hardware() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.json"))


def load_hardware(spec: str, overrides: dict[str, str] | None = None) -> Hardware:
    """`spec` is a built-in name (see list_hardware / aliases) or a .json/.yaml path; overrides are KEY=VALUE."""
    name = HARDWARE_ALIASES.get(spec.lower(), spec.lower())
    path = HARDWARE_DIR / f"{name}.json"
    if not path.exists():
        path = Path(spec)
        if not path.exists():
            raise PlanError(
                f"hardware: {spec!r} is neither a built-in ({', '.join(list_hardware())}) nor a file"
            )
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # optional dependency: only for YAML hardware files
        except ImportError as e:
            raise PlanError("hardware: YAML files need pyyaml (pip install pyyaml); or use JSON") from e
        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"hardware: {path} is not valid JSON ({e})") from e
    known = {f.name for f in dataclasses.fields(Hardware)}
    for k, v in (overrides or {}).items():
        if k not in known:
            raise PlanError(f"hardware.{k}: unknown field; known: {', '.join(sorted(known))}")
        raw[k] = v if k in ("name", "source", "notes") else float(v)
    unknown = set(raw) - known
    if unknown:
        raise PlanError(f"hardware.{sorted(unknown)[0]}: unknown field in {path}")
    missing = {f.name for f in dataclasses.fields(Hardware) if f.default is dataclasses.MISSING} - set(raw)
    if missing:
        raise PlanError(f"hardware.{sorted(missing)[0]}: required field missing in {path}")
    for k in ("chips_per_node", "scaleup_domain"):
        if k in raw:
            raw[k] = int(raw[k])
    return Hardware(**raw)


# ---------------------------------------------------------------------- inputs
@dataclass
class Assumptions:
    """Efficiency and overlap knobs (documented in docs/planning.md; all overridable with --assume KEY=VALUE)."""

    compute_efficiency: float = 0.6  # fraction of peak the kernels reach while computing
    link_efficiency: float = 0.7  # fraction of link bandwidth collectives reach
    hbm_reserve: float = 0.1  # HBM kept free (framework, fragmentation, NCCL/HCCL buffers)
    experts_per_token: float = 0.0  # K_e: FFN (non-zero) experts per token per layer; 0 → 2/3 of moe_topk
    gemm_m_half: float = 64.0  # GEMM rows M at which kernels run at half speed: factor M/(M+m)
    overlap_tp: float = 0.0  # fraction of each comm kind hidden behind compute
    overlap_ep: float = 0.7  # ScMoE: dispatch/combine overlap the dense FFN and the next attention
    overlap_dp: float = 0.9
    overlap_pp: float = 0.9
    overlap_cp: float = 0.5
    overlap_embp: float = 0.5
    overlap_offload: float = 0.5


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    dp: int = 1
    embp: int = 0  # n-gram table shards (embedding parallel); 0 → tp*cp*dp (all ranks of the first stage)
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B)
    zero1: bool = True
    recompute: str = "selective"
    offload: bool = False  # optimizer states + fp32 master weights in host memory, updated by the host
    micro_batch: int = 1

    @property
    def chips(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def stage_ranks(self) -> int:
        return self.tp * self.cp * self.dp

    def short(self) -> str:
        z = ("Z1" if self.zero1 else "Z0") + ("+off" if self.offload else "")
        return f"TP{self.tp} PP{self.pp} EP{self.ep} CP{self.cp} DP{self.dp} {z} rc={self.recompute}"


@dataclass
class TrainWorkload:
    train_tokens: float = 35e12
    global_batch: int = 2048  # sequences per optimizer step
    seq_len: int = 8192
    optimizer: str = "muon"  # muon | adamw
    precision: str = "bf16"  # GEMM precision for the peak: bf16 | fp8
    sparse_attention: bool = True  # LSA top-k attention in training (when the config has LSA)
    mtp: bool = True  # train the MTP head
    grad_bytes: int = 4  # main-gradient buffer dtype


def validate_layout(cfg: ModelConfig, lay: Layout, wl: TrainWorkload, chips: int | None = None) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise PlanError(f"{key}: {msg}")

    for k in ("tp", "pp", "ep", "cp", "dp", "vpp", "micro_batch"):
        v = getattr(lay, k)
        need(isinstance(v, int) and v >= 1, k, f"must be a positive integer, got {v!r}")
    need(lay.recompute in RECOMPUTE, "recompute", f"one of {RECOMPUTE}, got {lay.recompute!r}")
    if chips is not None:
        need(lay.chips == chips, "dp", f"tp*pp*cp*dp = {lay.tp}*{lay.pp}*{lay.cp}*{lay.dp} = {lay.chips} "
             f"but the cluster has {chips} chips")  # fmt: skip
    need(cfg.num_attention_heads % lay.tp == 0, "tp",
         f"{lay.tp} does not divide num_attention_heads ({cfg.num_attention_heads})")  # fmt: skip
    need(cfg.n_routed_experts % lay.ep == 0, "ep",
         f"{lay.ep} does not divide n_routed_experts ({cfg.n_routed_experts})")  # fmt: skip
    need(lay.stage_ranks % lay.ep == 0, "ep",
         f"{lay.ep} does not divide tp*cp*dp ({lay.stage_ranks}), the ranks of one pipeline stage")  # fmt: skip
    need(lay.pp * lay.vpp <= cfg.num_layers, "pp",
         f"pp*vpp ({lay.pp * lay.vpp}) exceeds num_layers ({cfg.num_layers})")  # fmt: skip
    need(wl.seq_len % (2 * lay.cp) == 0 or lay.cp == 1, "cp",
         f"seq_len ({wl.seq_len}) must be divisible by 2*cp ({2 * lay.cp}) for load-balanced causal CP")  # fmt: skip
    need(wl.global_batch % (lay.dp * lay.micro_batch) == 0, "global_batch",
         f"{wl.global_batch} is not divisible by dp*micro_batch ({lay.dp}*{lay.micro_batch})")  # fmt: skip
    embp = lay.embp or lay.stage_ranks
    need(lay.stage_ranks % embp == 0, "embp", f"{embp} does not divide tp*cp*dp ({lay.stage_ranks})")
    need(wl.optimizer in ("muon", "adamw"), "optimizer", f"'muon' or 'adamw', got {wl.optimizer!r}")
    need(wl.precision in ("bf16", "fp8"), "precision", f"'bf16' or 'fp8', got {wl.precision!r}")


# ---------------------------------------------------------------------- communication helpers
def _ring_time(payload: float, group: int, stride: int, hw: Hardware, eff: float) -> float:
    """One all-gather or reduce-scatter of `payload` bytes (full buffer) over `group` ranks spaced `stride` apart,
    done hierarchically: inside the scale-up domain, then across domains on 1/local of the data."""
    if group <= 1:
        return 0.0
    local = max(1, min(group, hw.scaleup_domain // stride))
    outer = group / local
    t = (local - 1) / local * payload / hw.scaleup_bw
    t += (outer - 1) / outer * payload / local / hw.scaleout_bw
    return t / eff


def _a2a_time(payload: float, group: int, stride: int, hw: Hardware, eff: float) -> float:
    """All-to-all where `payload` bytes leave each chip, spread evenly over the other group members."""
    if group <= 1:
        return 0.0
    local = max(1, min(group, hw.scaleup_domain // stride))
    intra = (local - 1) / (group - 1)
    return payload * (intra / hw.scaleup_bw + (1 - intra) / hw.scaleout_bw) / eff


def _k_e(cfg: ModelConfig, asm: Assumptions) -> float:
    return asm.experts_per_token or mm.default_experts_per_token(cfg)


def ep_remote_ranks(ep: int, experts_per_token: float, dedup: bool = True) -> float:
    """Expected remote EP ranks a token is sent to. Zero-expert slots never leave the chip; with dedup (DeepEP) a
    token goes once to each rank hosting at least one of its K_e FFN experts."""
    if ep <= 1:
        return 0.0
    if not dedup:
        return experts_per_token * (ep - 1) / ep
    return (ep - 1) * (1 - (1 - 1 / ep) ** experts_per_token)


# ---------------------------------------------------------------------- activations
def _act_elems_per_token_layer(cfg: ModelConfig, recompute: str, k_e: float) -> float:
    """Saved activation elements (2-byte units) per token per logical layer (2 MLA + 2 FFN + MoE + indexer).

    none: every tensor autograd keeps; selective: norms, SwiGLU activations and MLA up-projections (q_b, kv_b
    outputs) are recomputed, only GEMM inputs are kept; full: only the layer input (the working set of the one
    layer being recomputed is added separately).
    """
    H, ffn, eff = cfg.hidden_size, cfg.ffn_hidden_size, cfg.expert_ffn_hidden_size
    if recompute == "full":
        return H
    router = 2 * (cfg.n_routed_experts + cfg.zero_expert_num)  # fp32 logits
    n_i, d_i = (
        cfg.index_n_heads,
        cfg.index_head_dim,
    )  # q, k, head weights, int32 top-k indices (both sublayers)
    idx = n_i * d_i + d_i + n_i + 2 * cfg.index_topk if cfg.use_lsa else 0
    heads = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)  # q and attention output
    lat = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim  # q_a and kv_a outputs
    if recompute == "selective":
        return (
            2 * (H + lat + cfg.kv_lora_rank + heads) + 2 * (H + 2 * ffn) + k_e * (H + 2 * eff) + router + idx
        )
    return 2 * (2 * H + 2 * lat + 2 * heads) + 2 * (2 * H + 3 * ffn) + k_e * (H + 3 * eff) + router + idx


# ---------------------------------------------------------------------- training plan
def plan_training(
    cfg: ModelConfig, hw: Hardware, lay: Layout, wl: TrainWorkload, asm: Assumptions, chips: int | None = None
) -> dict[str, Any]:
    """Per-chip memory, per-step communication, step time, MFU and days to train for one layout."""
    validate_layout(cfg, lay, wl, chips)
    H, L, V, k_e = cfg.hidden_size, cfg.num_layers, cfg.vocab_size, _k_e(cfg, asm)
    layers = math.ceil(L / lay.pp)
    embp = lay.embp or lay.stage_ranks
    n_mb = wl.global_batch // (lay.dp * lay.micro_batch)
    pc = mm.count_parameters(cfg, k_e)
    b = pc["breakdown"]

    # ---- parameters per chip, split by optimizer family, for the first and the last pipeline stage
    ffn = 2 * mm.swiglu_params(cfg, cfg.ffn_hidden_size)
    dense_layer, expert_layer = 2 * mm.mla_params(cfg) + mm.indexer_params(cfg) + ffn, mm.expert_params(cfg)
    norms_router = 4 * H + mm.router_params(cfg)  # replicated over TP, AdamW
    mtp_emb = V * H if wl.mtp and cfg.num_mtp_modules else 0
    mtp_rest = pc["mtp"] - mtp_emb if wl.mtp else 0
    first = {
        "adam": b["embed_tokens"] / lay.tp,
        "tables": b["ngram_tables"] / embp,
        "muon": b["ngram_proj"] / lay.tp,
    }
    last = {"adam": (b["lm_head"] + H + mtp_emb) / lay.tp, "tables": 0.0, "muon": mtp_rest / lay.tp}
    both = {k: first[k] + last[k] for k in first}
    stages = [(both, 1)] if lay.pp == 1 else [(first, min(lay.pp, n_mb)), (last, 1)]
    dp_dense, dp_expert = lay.dp * lay.cp, lay.stage_ranks // lay.ep
    adam_b, muon_b = (
        12,
        (8 if wl.optimizer == "muon" else 12),
    )  # fp32 master + moments (AdamW m,v; Muon momentum)
    shard = (lambda g: g) if lay.zero1 else (lambda g: 1)
    tok_mb = lay.micro_batch * wl.seq_len / lay.cp  # tokens per micro-batch on one CP rank
    per_tok = _act_elems_per_token_layer(cfg, lay.recompute, k_e)

    def stage_memory(extra: dict[str, float], in_flight: int) -> tuple[dict[str, float], dict[str, float]]:
        p = {"muon": layers * dense_layer / lay.tp + extra["muon"], "adam": layers * norms_router + extra["adam"],
             "experts": layers * cfg.n_routed_experts * expert_layer / lay.ep, "tables": extra["tables"]}  # fmt: skip
        n = sum(p.values())
        opt = ((p["muon"] * muon_b + p["adam"] * adam_b) / shard(dp_dense)
               + p["experts"] * muon_b / shard(dp_expert) + p["tables"] * adam_b)  # fmt: skip
        act = 2 * per_tok * layers * tok_mb / lay.tp * in_flight
        if lay.recompute == "full":  # plus the working set of the layer being recomputed
            act += 2 * _act_elems_per_token_layer(cfg, "none", k_e) * tok_mb / lay.tp
        mem = {"weights": 2 * n, "gradients": wl.grad_bytes * n, "optimizer": opt, "activations": act}
        if extra is not first:
            mem["logits"] = 4 * tok_mb * V / lay.tp * (2 if mtp_emb else 1)
        if cfg.use_lsa:  # fp32 scores + ReLU of one query chunk against the whole sequence
            mem["indexer_scoring"] = (
                8 * min(cfg.index_query_chunk, tok_mb) * wl.seq_len * cfg.index_n_heads / lay.tp
            )
        return mem, p

    memory, params = max((stage_memory(e, f) for e, f in stages), key=lambda mp: sum(mp[0].values()))
    host_opt = memory["optimizer"] if lay.offload else 0.0  # offload: held and updated in host memory
    memory["optimizer"] -= host_opt
    memory["total"] = sum(memory.values())
    memory["capacity"] = hw.hbm_bytes * (1 - asm.hbm_reserve)
    params_chip = sum(params.values())

    # ---- communication bytes per chip per step, and time
    eff = asm.link_efficiency
    tok_rank = wl.global_batch * wl.seq_len / (lay.dp * lay.cp) / lay.tp  # tokens per chip per step (SP)
    fwd_passes = 2 if lay.recompute == "full" else 1
    payload = tok_rank * lay.tp * H * 2  # one TP collective's full buffer, summed over micro-batches
    n_tp = layers * 4 * 2 * (fwd_passes + 1)  # 4 blocks x (AG+RS) per forward pass and in backward
    comm_b, comm_t = {}, {}
    comm_b["tp"] = n_tp * (lay.tp - 1) / lay.tp * payload if lay.tp > 1 else 0.0
    comm_t["tp"] = n_tp * _ring_time(payload, lay.tp, 1, hw, eff)
    remote = ep_remote_ranks(lay.ep, k_e)
    ep_unit = layers * 2 * (fwd_passes + 1) * tok_rank * H * 2  # dispatch+combine, fwd(+recompute)+bwd
    comm_b["ep"] = ep_unit * remote
    comm_t["ep"] = _a2a_time(comm_b["ep"], lay.ep, 1, hw, eff)
    comm_b["ep_naive"] = (
        ep_unit * cfg.moe_topk * (lay.ep - 1) / lay.ep
    )  # zero-expert slots sent too, no dedup
    grads_dense = 2 * (params["muon"] + params["adam"])
    grads_exp = 2 * params["experts"]
    comm_b["dp"] = sum(2 * (g - 1) / g * p for p, g in ((grads_dense, dp_dense), (grads_exp, dp_expert)))
    comm_t["dp"] = 2 * (_ring_time(grads_dense, dp_dense, lay.tp, hw, eff)
                        + _ring_time(grads_exp, dp_expert, lay.ep, hw, eff))  # fmt: skip
    p2p = tok_rank * H * 2 * 2 * lay.vpp if lay.pp > 1 else 0.0
    comm_b["pp"] = p2p
    comm_t["pp"] = p2p / (hw.scaleup_bw if lay.chips <= hw.scaleup_domain else hw.scaleout_bw) / eff
    cp_payload = 0.0
    if lay.cp > 1:
        per_tok_kv = 2 * layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + (
            layers * 2 // cfg.cli_factor * cfg.index_head_dim if cfg.use_lsa else 0
        )
        cp_payload = tok_rank * lay.tp * lay.cp * per_tok_kv * 2 * (fwd_passes + 1)  # AG fwd, RS bwd
    comm_b["cp"] = cp_payload * (lay.cp - 1) / lay.cp
    comm_t["cp"] = _ring_time(cp_payload, lay.cp, lay.tp, hw, eff)
    emb_payload = tok_rank * H * 2 * 2 if cfg.use_ngram and embp > 1 else 0.0  # rows fwd, row grads bwd
    comm_b["embp"] = emb_payload * (embp - 1) / embp if embp > 1 else 0.0
    comm_t["embp"] = _a2a_time(comm_b["embp"], embp, 1, hw, eff)

    # offload: fp32 gradient shard down to the host, bf16 parameter shard back up
    comm_b["offload"] = host_opt / muon_b * (4 + 2)  # ≈ owned parameters x (fp32 grad + bf16 param)
    comm_t["offload"] = comm_b["offload"] / hw.host_bw

    # ---- FLOPs and time
    fl = mm.flops_per_token(cfg, wl.seq_len, k_e, sparse=wl.sparse_attention, mtp=wl.mtp)
    tokens_step = wl.global_batch * wl.seq_len
    model_flops = fl["train"] * tokens_step
    recompute_flops = {"none": 0.0, "selective": fl["attention_core"] + fl["indexer_scoring"],
                       "full": fl["forward"]}[lay.recompute]  # fmt: skip
    hw_flops = model_flops + recompute_flops * tokens_step
    peak = hw.peak(wl.precision)
    # small GEMMs are slower: dense GEMMs see M = tokens per micro-batch on a chip (sequence gathered over TP);
    # an expert sees M = the tokens routed to it from the EP group in one micro-batch
    m_dense = tok_mb
    m_expert = lay.ep * tok_mb / lay.tp * k_e / max(cfg.n_routed_experts, 1)
    f = lambda m: m / (m + asm.gemm_m_half) if m > 0 else 1.0
    expert_flops = 3 * fl["experts"] * tokens_step * (4 / 3 if lay.recompute == "full" else 1)
    compute = ((hw_flops - expert_flops) / f(m_dense) + expert_flops / f(m_expert)) / lay.chips
    compute *= layers * lay.pp / L / (peak * asm.compute_efficiency)  # the fullest stage sets the pace
    bubble = (lay.pp - 1) / (n_mb * lay.vpp) if lay.pp > 1 else 0.0
    exposed = {k: (1 - getattr(asm, f"overlap_{k}")) * t for k, t in comm_t.items()}
    step = compute * (1 + bubble) + sum(exposed.values())
    steps = wl.train_tokens / tokens_step
    mfu = model_flops / (step * lay.chips * peak)
    return {
        "layout": dataclasses.asdict(lay) | {"chips": lay.chips, "embp": embp, "micro_batches": n_mb},
        "workload": dataclasses.asdict(wl),
        "params_per_chip": params_chip, "params_per_chip_split": params, "host_optimizer_bytes": host_opt,
        "memory": memory, "fits": memory["total"] <= memory["capacity"],
        "comm_bytes": comm_b, "comm_time": comm_t, "comm_exposed": exposed,
        "flops_per_token": fl, "model_flops_per_step": model_flops, "hardware_flops_per_step": hw_flops,
        "compute_time": compute, "gemm_rows": {"dense": m_dense, "expert": m_expert}, "bubble": bubble,
        "step_time": step, "tokens_per_step": tokens_step, "steps": steps, "mfu": mfu,
        "days": steps * step / 86400, "chip_hours": steps * step * lay.chips / 3600,
    }  # fmt: skip


def check_fits(plan: dict[str, Any], hw: Hardware) -> None:
    m = plan["memory"]
    if not plan["fits"]:
        big = max(
            ("weights", "gradients", "optimizer", "activations", "logits", "indexer_scoring"), key=m.get
        )
        raise PlanError(
            f"memory: {m['total'] / 1e9:.1f} GB per chip exceeds the usable HBM of {hw.name} "
            f"({m['capacity'] / 1e9:.1f} GB); largest item: {big} {m[big] / 1e9:.1f} GB "
            "(try larger pp/ep, ZeRO-1, --recompute full, --offload, or --search)"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_layouts(
    cfg: ModelConfig, hw: Hardware, chips: int, wl: TrainWorkload, asm: Assumptions, top: int = 10,
    micro_batch: int = 1, fixed: dict[str, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Layouts (TP, PP, CP, DP, EP, ZeRO-1, offload, recompute) on exactly `chips` chips that validate and fit,
    ranked by step time; one (the best) per (TP, PP, CP, DP). TP is a power of 2 inside one scale-up domain.
    `fixed` pins degrees (e.g. {"tp": 8})."""
    results, rejected = [], {}
    divs = _divisors(chips)
    ok = lambda k, v: not fixed or fixed.get(k) in (None, v)
    tps = [t for t in divs if t & (t - 1) == 0 and t <= min(hw.scaleup_domain, 64) and ok("tp", t)]
    for tp in tps:
        for pp in (p for p in divs if p <= cfg.num_layers and (chips // tp) % p == 0 and ok("pp", p)):
            for cp in (c for c in divs if (chips // (tp * pp)) % c == 0 and c <= 64 and ok("cp", c)):
                dp = chips // (tp * pp * cp)
                best = None
                eps = [e for e in _divisors(cfg.n_routed_experts) if (tp * cp * dp) % e == 0 and ok("ep", e)]
                for ep in eps if ok("dp", dp) else []:
                    base = Layout(tp=tp, pp=pp, ep=ep, cp=cp, dp=dp, micro_batch=micro_batch)
                    try:
                        validate_layout(cfg, base, wl, chips)
                    except PlanError as e:
                        key = str(e).split(":")[0]
                        rejected[key] = rejected.get(key, 0) + 1
                        continue
                    for zero1, offload, rc in itertools.product((True, False), (False, True), RECOMPUTE):
                        lay = dataclasses.replace(base, zero1=zero1, offload=offload, recompute=rc)
                        p = plan_training(cfg, hw, lay, wl, asm, chips)
                        if not p["fits"]:
                            rejected["memory"] = rejected.get("memory", 0) + 1
                            continue
                        rank = (p["step_time"], p["memory"]["total"])
                        if best is None or rank < best[0]:
                            best = (rank, p)
                if best:
                    results.append(best[1])
    results.sort(key=lambda p: (p["step_time"], p["memory"]["total"]))
    return {"chips": chips, "feasible": len(results), "rejected": rejected, "best": results[:top]}


# ---------------------------------------------------------------------- serving
@dataclass
class ServeWorkload:
    context: int = 131072
    concurrency: int = 0  # 0 → the maximum that fits
    kv_bytes: int = 2  # 2 = BF16 latent, 1 = FP8 (FlashMLA layout)
    index_bytes: int = 1  # 1 = FP8 + fp32 scale (SGLang), 2 = BF16
    weight_bytes: int = 1  # 1 = FP8 MLA/dense/experts (the rest BF16, as the released FP8 checkpoint)
    instance_chips: int = 0  # 0 → smallest whole number of nodes that holds the weights and one sequence
    target_tps: float = 0.0  # per-sequence decode tokens/s target (0: none)


def plan_serving(cfg: ModelConfig, hw: Hardware, sw: ServeWorkload, asm: Assumptions) -> dict[str, Any]:
    """Cache sizes, decode bytes dense vs LSA, concurrency per node/instance, and the bandwidth floor."""
    if sw.context <= 0:
        raise PlanError(f"context: must be > 0, got {sw.context}")
    k_e = _k_e(cfg, asm)
    pc = mm.count_parameters(cfg, k_e)
    b = pc["breakdown"]
    # FP8 checkpoint: MLA projections, dense FFNs and experts quantised; everything else stays BF16
    quant = b["attention"] + b["dense_ffn"] + b["routed_experts"]
    mtp_quant = cfg.num_mtp_modules * (mm.mla_params(cfg) + mm.swiglu_params(cfg, cfg.ffn_hidden_size))
    weights = (quant + mtp_quant) * sw.weight_bytes + (pc["total"] + pc["mtp"] - quant - mtp_quant) * 2
    kv = mm.kv_cache_bytes_per_token(cfg, sw.kv_bytes)
    idx = mm.indexer_cache_bytes_per_token(cfg, sw.index_bytes) if cfg.use_lsa else 0
    mtp_c = mm.mtp_cache_bytes_per_token(cfg, sw.kv_bytes, sw.index_bytes)
    per_seq = (kv + idx + mm.hi_summary_bytes_per_token(cfg) + mtp_c) * sw.context
    usable = hw.hbm_bytes * (1 - asm.hbm_reserve)
    chips = sw.instance_chips
    if not chips:
        nodes = max(1, math.ceil((weights + per_seq) / (usable * hw.chips_per_node)))
        chips = nodes * hw.chips_per_node
    free = usable * chips - weights
    if free < per_seq:
        raise PlanError(
            f"instance_chips: {chips} chips of {hw.name} hold {usable * chips / 1e9:.0f} GB usable but weights need "
            f"{weights / 1e9:.0f} GB plus {per_seq / 1e9:.1f} GB for one {sw.context}-token sequence"
        )
    max_conc = int(free // per_seq)
    conc = sw.concurrency or max_conc
    if conc > max_conc:
        raise PlanError(f"concurrency: {conc} sequences of {sw.context} tokens need {conc * per_seq / 1e9:.0f} GB "
                        f"of cache; {chips} chips have {free / 1e9:.0f} GB after weights (max {max_conc})")  # fmt: skip
    dec = mm.decode_bytes_per_step(cfg, sw.context, sw.kv_bytes, sw.index_bytes)
    # weights read per decode step: every active non-expert weight, the distinct experts the batch hits, and
    # per sequence one embedding row + the n-gram rows (H elements each)
    e, L = cfg.n_routed_experts, cfg.num_layers
    distinct = e * (1 - (1 - min(k_e, e) / e) ** conc)
    q_active = b["attention"] + b["dense_ffn"]
    w_read = q_active * sw.weight_bytes + (pc["active_min"] - q_active) * 2
    w_read += distinct * L * mm.expert_params(cfg) * sw.weight_bytes
    w_read += conc * cfg.hidden_size * 2 * (2 if cfg.use_ngram else 1)
    bw = chips * hw.hbm_bw
    floors = {}
    for mode in ("dense", "sparse"):
        step_bytes = w_read + conc * dec[mode]  # target model only (MTP drafts excluded)
        t = step_bytes / bw
        floors[mode] = {
            "bytes": step_bytes,
            "seconds": t,
            "tokens_per_s_per_seq": 1 / t,
            "tokens_per_s": conc / t,
        }
    out = {
        "context": sw.context,
        "instance_chips": chips,
        "nodes": chips / hw.chips_per_node,
        "weights_bytes": weights,
        "kv_bytes_per_token": kv,
        "indexer_bytes_per_token": idx,
        "mtp_cache_bytes_per_token": mtp_c,
        "cache_bytes_per_sequence": per_seq,
        "decode_bytes_per_seq": dec,
        "max_concurrency": max_conc,
        "max_concurrency_per_node": max_conc / (chips / hw.chips_per_node),
        "concurrency": conc,
        "weights_read_per_step": w_read,
        "decode_floor": floors,
    }
    if sw.target_tps:
        out["meets_target"] = (
            floors["sparse" if cfg.use_lsa else "dense"]["tokens_per_s_per_seq"] >= sw.target_tps
        )
    return out


def assumptions_from(pairs: list[str]) -> Assumptions:
    asm = Assumptions()
    for p in pairs:
        k, _, v = p.partition("=")
        if not hasattr(asm, k) or not v:
            raise PlanError(f"assume.{k}: unknown assumption or missing value; known: "
                            f"{', '.join(f.name for f in dataclasses.fields(asm))}")  # fmt: skip
        setattr(asm, k, float(v))
    return asm


def as_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: as_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [as_jsonable(v) for v in x]
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    return x
