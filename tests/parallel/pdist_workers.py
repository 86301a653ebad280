"""Functions run on every rank by `pdist_launch.run_distributed` (module-level so spawn can import them)."""

from __future__ import annotations

import copy
from typing import Any

import pdist_recipe as recipe
import torch
from torch.distributed.tensor import DTensor

from longcat2 import parallel as P
from longcat2.model.moe import MoE


# ---------------------------------------------------------------------- dispatch / combine
def _set_bias(moe: MoE, case: str, rank: int) -> None:
    e, total = moe.n_routed, moe.router.num_experts
    b = torch.zeros(total)
    if case == "mixed":  # rank 0 routes everything to zero experts, rank 1 everything to expert 0 (on rank 0)
        case = "all_zero" if rank == 0 else "one_expert_local"
    if case == "one_expert_local":  # expert 0 (owned by ep rank 0) + two zero experts
        b[0], b[e:] = 10.0, 10.0
    elif case == "one_expert_remote":  # expert e-1 (owned by the last ep rank)
        b[e - 1], b[e:] = 10.0, 10.0
    elif case == "all_zero":
        b[e:] = 10.0
    moe.router.e_score_correction_bias.copy_(b)


def dispatch_worker(rank: int, world: int) -> dict[str, Any]:
    info = P.init_distributed(ep=world)
    errors = errors_worker(rank, world)
    model = recipe.make_model()
    ref = model.model.layers[0].mlp
    sc = copy.deepcopy(ref)
    P.expert_parallel(sc, info.mesh["ep"])
    nsc = copy.deepcopy(ref)
    P.dispatch_zero_experts(nsc, info.mesh["ep"])
    n_local = ref.n_routed // world
    sl = slice(rank * n_local, (rank + 1) * n_local)
    report: dict[str, Any] = {}
    for case in ("natural", "one_expert_local", "one_expert_remote", "all_zero", "mixed"):
        for m in (ref, sc, nsc):
            _set_bias(m, case, rank)
            m.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(12, ref.router.classifier.in_features, generator=g)
        gy = torch.randn(x.shape, generator=g)
        xr = x.clone().requires_grad_(True)
        out_ref = ref(xr)
        out_ref.backward(gy)
        ids = ref.last_topk
        ref_grads = {}
        for n in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(ref.experts, n)
            ref_grads[n] = w.grad.clone() if w.grad is not None else torch.zeros_like(w)
        for n in ref_grads:  # what the owner should hold: Σ_ranks grad / ep
            P.all_reduce_sum(ref_grads[n])
            ref_grads[n] /= world
        res = {"routed_slots": int((ids < ref.n_routed).sum())}
        for name, m in (("short_circuit", sc), ("no_short_circuit", nsc)):
            before = P.expert_traffic(m).rows_sent
            xe = x.clone().requires_grad_(True)
            out = m(xe)
            out.backward(gy)
            torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6, msg=f"{case}/{name}: output")
            torch.testing.assert_close(
                xe.grad, xr.grad, rtol=1e-5, atol=1e-6, msg=f"{case}/{name}: input grad"
            )
            torch.testing.assert_close(
                m.router.classifier.weight.grad, ref.router.classifier.weight.grad, rtol=1e-5, atol=1e-6
            )
            for n, want in ref_grads.items():
                got = getattr(m.experts, n).grad
                assert isinstance(got, DTensor), f"{case}/{name}: {n} grad is not a DTensor"
                torch.testing.assert_close(
                    got.to_local(), want[sl], rtol=1e-5, atol=1e-6, msg=f"{case}/{name}: {n}"
                )
            res[name + "_rows_sent"] = P.expert_traffic(m).rows_sent - before
        report[case] = res
    report["errors"] = errors
    return report


# ---------------------------------------------------------------------- training parity + checkpoints
def _setup(preset: str, mesh, ep: int, optimizer: str = "muon", **kw: Any):
    model = recipe.make_model(preset)
    P.parallelize(model, mesh, ep=ep, **kw)
    return model, recipe.make_optimizer(model, optimizer), recipe.BiasUpdate(model)


def train_worker(
    rank: int,
    world: int,
    ep: int,
    n_steps: int,
    configs: list[dict[str, Any]],
    save: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train each config from the same init on the same global batches; optionally save/export mid-run."""
    info = P.init_distributed(ep=ep)
    data = recipe.batches(n_steps)
    out: dict[str, Any] = {}
    for cfg in configs:
        cfg = dict(cfg)
        name = cfg.pop("name")
        preset = cfg.pop("preset", "tiny-flash")
        cep = cfg.pop("ep", ep)
        mesh = info.mesh if cep == ep else P.build_mesh("cpu", world, cep)
        model, opt, bias = _setup(preset, mesh, cep, **cfg)
        if save is None:
            out[name] = {"losses": recipe.train(model, opt, data, rank, world, bias)}
            continue
        k = save["at"]
        first = recipe.train(model, opt, data[:k], rank, world, bias)
        extra = {"step": k, "data": {"epoch": 0, "index": k * 4}}
        P.save_sharded(save["dir"], model, opt, extra=extra, mesh_info={"ep": cep}, files=save.get("files"))
        probe = recipe.logits(model, recipe.probe())
        if save.get("export"):
            P.export_hf(model, save["export"])
        rest = recipe.train(model, opt, data[k:], rank, world, bias)
        out[name] = {"losses": first + rest, "probe": probe}
    return out


def load_worker(
    rank: int,
    world: int,
    ep: int,
    n_steps: int,
    ckpt: str,
    train_configs: list[dict[str, Any]],
    parity_steps: int,
):
    """Optionally train fresh configs (parity, `parity_steps`), then load `ckpt` into a differently seeded
    model and train on to `n_steps`."""
    out = train_worker(rank, world, ep, parity_steps, train_configs) if train_configs else {}
    info = P.init_distributed(ep=ep)
    model = recipe.make_model(seed=123)  # different init: the load must overwrite everything
    P.parallelize(model, info.mesh, ep=ep)
    opt = recipe.make_optimizer(model)
    bias = recipe.BiasUpdate(model)
    st = P.load_sharded(ckpt, model, opt)
    k = int(st.extra["step"])
    data = recipe.batches(n_steps)
    out["loaded"] = {
        "step": k,
        "saved_world_size": st.saved_world_size,
        "rng_restored": st.rng_restored,
        "probe": recipe.logits(model, recipe.probe()),
        "losses": recipe.train(model, opt, data[k:], rank, world, bias),
    }
    return out


def errors_worker(rank: int, world: int) -> dict[str, str]:
    """Mesh/degree validation inside a real 2-rank job: the messages name the field."""
    info = P.init_distributed(ep=world)
    msgs = {}
    try:
        P.build_mesh("cpu", world * 2, 2)
    except P.ParallelConfigError as e:
        msgs["world_size"] = str(e)
    model = recipe.make_model()
    model.config.n_routed_experts = 3  # as if the preset had 3 routed experts
    try:
        P.parallelize(model, P.build_mesh("cpu", world, world))
    except P.ParallelConfigError as e:
        msgs["n_routed_experts"] = str(e)
    try:
        P.parallelize(recipe.make_model(), info.mesh, ep=1)
    except P.ParallelConfigError as e:
        msgs["ep"] = str(e)
    return msgs
