"""Capacity planner: published figures, model cross-checks, layout validation, serving, and the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longcat2.config import ModelConfig
from longcat2.plan import (
    Assumptions,
    Layout,
    PlanError,
    ServeWorkload,
    TrainWorkload,
    count_parameters,
    decode_bytes_per_step,
    flops_per_token,
    indexer_cache_bytes_per_token,
    kv_cache_bytes_per_token,
    list_hardware,
    load_hardware,
    plan_serving,
    plan_training,
    search_layouts,
    validate_layout,
)
from longcat2.plan.cluster import ep_remote_ranks

REPO = Path(__file__).resolve().parents[1]
TINY = ["tiny", "tiny-flash", "tiny-flash-lite"]


def _within(x: float, ref: float, rel: float = 0.01) -> bool:
    return abs(x - ref) <= rel * abs(ref)


# ---------------------------------------------------------------------- published figures (spec §6)
@pytest.mark.parametrize(
    "preset,total,amin,amax",
    [
        ("longcat-2.0", 1638.6e9, 33.4e9, 56.4e9),
        ("longcat-flash", 560.7e9, 18.7e9, 31.4e9),
        ("longcat-flash-lite", 68.56e9, 2.93e9, 4.52e9),  # spec §6 table (claims round to 2.9–4.5)
    ],
)
def test_published_parameter_counts(preset: str, total: float, amin: float, amax: float) -> None:
    pc = count_parameters(ModelConfig.from_preset(preset))
    assert _within(pc["total"], total) and _within(pc["active_min"], amin) and _within(pc["active_max"], amax)
    assert pc["total"] == sum(pc["breakdown"].values())
    assert pc["active_min"] < pc["active_avg"] < pc["active_max"]


@pytest.mark.parametrize("preset", TINY)
def test_default_experts_per_token_scales_with_topk(preset: str) -> None:
    cfg = ModelConfig.from_preset(preset)
    pc = count_parameters(cfg)
    assert pc["experts_per_token"] == cfg.moe_topk * 2 / 3
    assert pc["active_min"] < pc["active_avg"] < pc["active_max"] < pc["total"]


def test_longcat2_component_figures() -> None:
    pc = count_parameters(ModelConfig.from_preset("longcat-2.0"))
    b = pc["breakdown"]
    assert _within(b["ngram_tables"], 134.98e9, 0.001) and _within(b["routed_experts"], 1468.88e9, 0.001)
    assert _within(pc["per_expert_all_layers"], 1.913e9, 0.001)
    assert _within(pc["active_avg"], 48.7e9)  # K_e = 8 → "~48 B active"
    assert _within(pc["mtp"], 1.9e9, 0.02)
    lite = count_parameters(ModelConfig.from_preset("longcat-flash-lite"))["breakdown"]
    assert _within(lite["ngram_tables"], 31.4e9)


def test_cache_bytes_per_token() -> None:
    cfg = ModelConfig.from_preset("longcat-2.0")
    assert kv_cache_bytes_per_token(cfg) == 87_552 == 76 * 576 * 2
    assert kv_cache_bytes_per_token(cfg, 1) == 76 * 656  # FlashMLA FP8: 512 e4m3 + 4 scales + 64 bf16
    assert indexer_cache_bytes_per_token(cfg, 1) == 38 * 132
    assert indexer_cache_bytes_per_token(cfg, 2) == 38 * 256
    assert indexer_cache_bytes_per_token(cfg.replace(cli_factor=1), 2) == 76 * 256
    assert indexer_cache_bytes_per_token(ModelConfig.from_preset("longcat-flash"), 1) == 0


# sparse_attention.md §5.2, LongCat-2.0 rows: (L, kv bytes, index bytes, dense, main, indexer, total, ratio, share)
_TABLE_5_2 = [
    (131072, 2, 1, 11.48, 0.179, 0.66, 0.84, 13.7, 0.79),
    (131072, 2, 2, 11.48, 0.179, 1.28, 1.45, 7.9, 0.88),
    (1048576, 2, 1, 91.80, 0.179, 5.26, 5.44, 16.9, 0.97),
    (1048576, 1, 1, 52.28, 0.102, 5.26, 5.36, 9.8, 0.98),
]


@pytest.mark.parametrize("ctx,kvb,ib,dense,main,idx,total,ratio,share", _TABLE_5_2)
def test_decode_bytes_table(ctx, kvb, ib, dense, main, idx, total, ratio, share) -> None:  # noqa: ANN001
    d = decode_bytes_per_step(ModelConfig.from_preset("longcat-2.0"), ctx, kvb, ib)
    for key, ref in (("dense", dense), ("sparse_main", main), ("indexer", idx), ("sparse", total)):
        assert _within(d[key] / 1e9, ref, 0.01 if ref > 1 else 0.02), key  # the table rounds to 2 dp
    assert _within(d["ratio"], ratio, 0.01) and abs(d["share"] - share) < 0.01


def test_decode_bytes_short_context_and_no_lsa() -> None:
    cfg = ModelConfig.from_preset("longcat-2.0")
    d = decode_bytes_per_step(cfg, 1000)  # below index_topk: main attention reads everything
    assert d["sparse_main"] == d["dense"]
    f = decode_bytes_per_step(ModelConfig.from_preset("longcat-flash"), 131072)
    assert f["sparse"] == f["dense"] and f["indexer"] == 0


# ---------------------------------------------------------------------- FLOPs
def test_flops_lsa_structure() -> None:
    cfg = ModelConfig.from_preset("longcat-2.0")
    short = flops_per_token(cfg, 2048)
    assert short["attention_core"] == flops_per_token(cfg, 2048, sparse=False)["attention_core"]
    a, b = flops_per_token(cfg, 65536), flops_per_token(cfg, 131072)
    assert _within(b["indexer_scoring"] / a["indexer_scoring"], 2.0, 0.001)  # quadratic: per-token cost ∝ L
    assert b["attention_core"] / a["attention_core"] < 1.02  # O(L·k): per-token cost flat once L >> k
    dense = flops_per_token(cfg, 131072, sparse=False)
    assert dense["attention_core"] > 30 * b["attention_core"]
    one = flops_per_token(cfg.replace(cli_factor=1), 131072)
    assert one["indexer_scoring"] == 2 * b["indexer_scoring"]  # CLI halves indexer passes
    assert b["train"] == 3 * b["forward"] and b["forward"] == b["trunk"] + b["mtp"]
    assert flops_per_token(cfg, 8192, mtp=False)["mtp"] == 0
    # ~6·N_active rule of thumb for the GEMM part at short context
    gemm = short["trunk"] - short["attention_core"] - short["indexer_scoring"]
    assert _within(gemm, 2 * count_parameters(cfg)["active_avg"], 0.01)


# ---------------------------------------------------------------------- the instantiated model
def _model_cls():  # noqa: ANN202
    try:
        from longcat2.model.longcat import LongCatForCausalLM
    except ImportError as e:  # the model package is written in parallel; only a missing import skips
        pytest.skip(f"longcat2.model not importable: {e}")
    return LongCatForCausalLM


def _bucket(name: str) -> str:
    if name.startswith("model.mtp."):
        return "mtp"
    rules = [("ngram_embeddings.embedders", "ngram_tables"), ("ngram_embeddings.post_projs", "ngram_proj"),
             (".indexer.", "indexer"), (".self_attn.", "attention"), (".mlps.", "dense_ffn"),
             ("layernorm", "layer_norms"), (".mlp.router.", "router"), (".mlp.experts.", "routed_experts"),
             ("model.embed_tokens.", "embed_tokens"), ("lm_head.", "lm_head"), ("model.norm.", "final_norm")]  # fmt: skip
    for key, bucket in rules:
        if key in name or name.startswith(key):
            return bucket
    raise AssertionError(f"parameter {name} not accounted for by the planner")


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize(
    "overrides",
    [{}, {"cli_factor": 1}, {"mtp_replicate_modules": False}, {"tie_word_embeddings": True},
     {"index_k_norm_type": "layernorm"}],
)  # fmt: skip
def test_counts_match_model(preset: str, overrides: dict) -> None:
    cls = _model_cls()
    cfg = ModelConfig.from_preset(preset, **overrides)
    model = cls(cfg)
    got: dict[str, int] = {}
    for name, p in model.named_parameters():  # shared (tied) tensors are yielded once
        got[_bucket(name)] = got.get(_bucket(name), 0) + p.numel()
    pc = count_parameters(cfg)
    assert got.pop("mtp", 0) == pc["mtp"]
    assert got == {k: v for k, v in pc["breakdown"].items() if v}
    assert sum(p.numel() for p in model.parameters()) == pc["total"] + pc["mtp"]


@pytest.mark.parametrize("preset", ["tiny-flash", "tiny-flash-lite"])
def test_gemm_flops_match_model(preset: str) -> None:
    """torch's FLOP counter sees every nn.Linear as aten.mm; experts (grouped GEMM) and attention are excluded."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cls = _model_cls()
    cfg = ModelConfig.from_preset(preset)
    model = cls(cfg).eval()
    seq = 48
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, seq)))
    mm_flops = sum(v for k, v in fc.get_flop_counts()["Global"].items() if str(k) == "aten.mm")
    f = flops_per_token(cfg, seq, mtp=False)
    ours = f["attention_proj"] + f["dense_ffn"] + f["router"] + f["lm_head"] + f["ngram_proj"]
    assert mm_flops == ours * seq


# ---------------------------------------------------------------------- training layouts
def _train(preset: str = "longcat-2.0", hw: str = "h200", chips: int | None = None, **lay):  # noqa: ANN003, ANN202
    wl = TrainWorkload(global_batch=lay.pop("global_batch", 1024), seq_len=lay.pop("seq_len", 8192))
    return plan_training(
        ModelConfig.from_preset(preset), load_hardware(hw), Layout(**lay), wl, Assumptions(), chips
    )


def test_layout_validation_errors_name_the_field() -> None:
    with pytest.raises(PlanError, match=r"^ep: 7 does not divide n_routed_experts \(768\)"):
        _train(tp=8, pp=4, ep=7, dp=28)
    with pytest.raises(PlanError, match=r"^dp: tp\*pp\*cp\*dp = 8\*4\*1\*16 = 512 but the cluster has 1024"):
        _train(chips=1024, tp=8, pp=4, ep=8, dp=16)
    with pytest.raises(PlanError, match=r"^tp: 3 does not divide num_attention_heads"):
        _train(tp=3, dp=2)
    with pytest.raises(PlanError, match=r"^ep: 64 does not divide tp\*cp\*dp \(32\)"):
        _train(tp=8, dp=4, ep=64)
    with pytest.raises(PlanError, match=r"^global_batch: 1000 is not divisible"):
        _train(tp=8, dp=16, global_batch=1000)
    with pytest.raises(PlanError, match=r"^cp: seq_len"):
        _train(tp=8, cp=3, dp=2, seq_len=8192)
    with pytest.raises(PlanError, match=r"^pp: "):
        _train(pp=64, dp=2)
    with pytest.raises(PlanError, match=r"^recompute: "):
        _train(recompute="some")


def test_memory_over_hbm_is_a_clear_error() -> None:
    from longcat2.plan.cluster import check_fits

    hw = load_hardware("h200")
    plan = _train(tp=8, ep=8, dp=8)  # 1.6 T parameters over 64 chips
    assert not plan["fits"]
    with pytest.raises(
        PlanError, match=r"^memory: .* GB per chip exceeds the usable HBM of NVIDIA H200.*largest"
    ):
        check_fits(plan, hw)


def test_memory_options_move_bytes_as_expected() -> None:
    base = dict(tp=8, pp=8, ep=64, dp=64)
    z0, z1 = _train(**base, zero1=False), _train(**base, zero1=True)
    assert z1["memory"]["optimizer"] < z0["memory"]["optimizer"] / 4  # n-gram table states cannot shard
    assert (
        z1["memory"]["weights"] == z0["memory"]["weights"]
        and z1["comm_bytes"]["dp"] == z0["comm_bytes"]["dp"]
    )
    acts = [_train(**base, recompute=r)["memory"]["activations"] for r in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]
    off = _train(**base, offload=True)
    assert off["memory"]["optimizer"] == 0 and off["host_optimizer_bytes"] == z1["memory"]["optimizer"]
    assert off["step_time"] > z1["step_time"]
    assert _train(**base, recompute="full")["step_time"] > _train(**base, recompute="none")["step_time"]


def test_zero_experts_stay_local_in_ep_traffic() -> None:
    assert ep_remote_ranks(1, 8) == 0
    for ep in (8, 64, 256):
        assert (
            ep_remote_ranks(ep, 8)
            < ep_remote_ranks(ep, 8, dedup=False)
            < ep_remote_ranks(ep, 12, dedup=False)
        )
    p = _train(tp=8, pp=8, ep=64, dp=64)
    assert p["comm_bytes"]["ep"] < p["comm_bytes"]["ep_naive"] * 8 / 12


def test_training_time_is_consistent() -> None:
    p = _train(tp=8, pp=8, ep=64, dp=64)
    fl = p["flops_per_token"]["train"]
    assert _within(p["model_flops_per_step"], fl * 1024 * 8192, 1e-9)
    assert p["step_time"] >= p["compute_time"]
    assert _within(p["days"] * 86400, p["steps"] * p["step_time"], 1e-9)
    assert 0 < p["mfu"] < Assumptions().compute_efficiency


def test_search_ranks_layouts_that_fit() -> None:
    cfg = ModelConfig.from_preset("longcat-flash-lite")
    hw = load_hardware("h100")
    res = search_layouts(cfg, hw, 64, TrainWorkload(global_batch=256, seq_len=4096), Assumptions(), top=5)
    assert res["feasible"] > 0 and 0 < len(res["best"]) <= 5
    times = [p["step_time"] for p in res["best"]]
    assert times == sorted(times)
    for p in res["best"]:
        lay = p["layout"]
        assert p["fits"] and lay["chips"] == 64 and cfg.n_routed_experts % lay["ep"] == 0
    pinned = search_layouts(cfg, hw, 64, TrainWorkload(global_batch=256, seq_len=4096), Assumptions(), 50,
                            fixed={"tp": 2})  # fmt: skip
    assert pinned["best"] and all(p["layout"]["tp"] == 2 for p in pinned["best"])
    with pytest.raises(PlanError):
        validate_layout(cfg, Layout(ep=3), TrainWorkload())


# ---------------------------------------------------------------------- hardware and serving
def test_hardware_files() -> None:
    names = list_hardware()
    assert {"h100-sxm", "h200", "ascend-910c-cm384", "cpu-this-machine"} <= set(names)
    for n in names:
        hw = load_hardware(n)
        assert hw.source and hw.bf16_flops > 0 and hw.scaleup_domain >= hw.chips_per_node
    assert load_hardware("910c").scaleup_domain == 384 and load_hardware("910c").peak("fp8") == 752e12
    assert load_hardware("h200", {"hbm_bytes": "1e11"}).hbm_bytes == 1e11
    with pytest.raises(PlanError, match=r"^hardware.hbm_gb: unknown field"):
        load_hardware("h200", {"hbm_gb": "80"})
    with pytest.raises(PlanError, match=r"^hardware: 'nope'"):
        load_hardware("nope")


def test_hardware_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "chip.json"
    p.write_text(json.dumps({"name": "x", "bf16_flops": 1e15, "hbm_bytes": 1e11, "hbm_bw": 1e12}))
    with pytest.raises(PlanError, match=r"^hardware.chips_per_node: required field missing"):
        load_hardware(str(p))
    raw = json.loads((REPO / "longcat2/hardware/h200.json").read_text()) | {"hbm_bw": -1}
    p.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match=r"^hardware.hbm_bw: must be a positive number"):
        load_hardware(str(p))


def test_serving_plan() -> None:
    cfg = ModelConfig.from_preset("longcat-2.0")
    hw = load_hardware("h200")
    s = plan_serving(cfg, hw, ServeWorkload(context=1048576), Assumptions())
    assert s["instance_chips"] == 16  # FP8 weights need two 8×H200 nodes (SGLang cookbook)
    assert s["kv_bytes_per_token"] == 87_552 and s["indexer_bytes_per_token"] == 5016
    assert s["max_concurrency"] >= 1 and s["concurrency"] == s["max_concurrency"]
    fl = s["decode_floor"]
    assert fl["sparse"]["seconds"] < fl["dense"]["seconds"]
    one = plan_serving(cfg, hw, ServeWorkload(context=131072, concurrency=1), Assumptions())
    assert _within(one["weights_read_per_step"], 48.7e9 + 2e9, 0.05)  # ≈ active params, FP8 + a few BF16
    with pytest.raises(PlanError, match=r"^concurrency: "):
        plan_serving(cfg, hw, ServeWorkload(context=1048576, concurrency=1000), Assumptions())
    with pytest.raises(PlanError, match=r"^instance_chips: "):
        plan_serving(cfg, hw, ServeWorkload(context=1048576, instance_chips=8), Assumptions())


# ---------------------------------------------------------------------- the real CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longcat2", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)  # fmt: skip


def test_cli_json_train_and_serve() -> None:
    r = _cli("--preset", "longcat-2.0", "--hardware", "910c", "--chips", "49152", "--tp", "8", "--pp", "8",
             "--ep", "96", "--global-batch", "6144", "--serve", "--context", "1048576", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["params"]["total"] == count_parameters(ModelConfig.from_preset("longcat-2.0"))["total"]
    assert out["kv_bytes_per_token"]["bf16"] == 87_552
    assert out["train"]["layout"]["dp"] == 768 and out["train"]["fits"]
    assert 0 < out["train"]["mfu"] < 1 and out["train"]["days"] > 0
    assert _within(out["serve"]["decode_bytes_per_seq"]["dense"] / 1e9, 91.80, 0.01)


def test_cli_errors_and_table(tmp_path: Path) -> None:
    r = _cli("--preset", "longcat-2.0", "--chips", "1024", "--tp", "8", "--ep", "7")
    assert r.returncode == 2 and "ep: 7 does not divide n_routed_experts (768)" in r.stderr
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(ModelConfig.from_preset("longcat-flash").to_hf()))
    r = _cli("--config", str(cfg_path), "--hardware", "h100")
    assert r.returncode == 0 and "560.66 B" in r.stdout and "parameters" in r.stdout


def test_cli_search_needs_a_cluster_size() -> None:
    r = _cli("--preset", "longcat-2.0", "--search")
    assert r.returncode == 2 and "--chips N (e.g. --chips 128)" in r.stderr and "Traceback" not in r.stderr
    # pinned tp, pp, cp and dp give the cluster size: their product (8 * 4 * 1 * 4 = 128 chips)
    r = _cli("--preset", "longcat-flash-lite", "--search", "--tp", "8", "--pp", "4", "--cp", "1", "--dp", "4",
             "--global-batch", "512", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["search"]["chips"] == 128


def test_cli_serve_layout_fp8_fits_16_h200_bf16_does_not() -> None:
    """The reference deployment: LongCat-2.0-FP8 on 16 H200 with TP16 + EP16 (per-device bytes come from the
    real sharding of a meta model; tests/parallel/test_loading.py checks them against measured bytes)."""
    r = subprocess.run([sys.executable, "-m", "longcat2", "plan", "--serve", "--preset", "longcat-2.0",
                        "--hardware", "h200", "--chips", "16", "--json"], capture_output=True, text=True,
                       cwd=REPO, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["serve_layout"]
    assert (s["chips"], s["tp"], s["ep"]) == (16, 16, 16)
    fp8, bf16 = s["weights"]["fp8"], s["weights"]["bf16"]
    assert fp8["fits"] and not bf16["fits"] and fp8["cache_tokens_per_device"] > 100_000
    assert 0.5 < fp8["bytes_per_device"] / bf16["bytes_per_device"] < 0.6


def test_hierarchical_indexing_decode_bytes() -> None:
    """HI at 1M (LongCat-2.0, fp8 keys): the indexer reads the bf16 sub-block means of every page plus the
    keys of the 1024 kept pages of 128 tokens, instead of every key; below lsa_hi_min_len nothing changes."""
    cfg = ModelConfig.from_preset("longcat-2.0").replace(lsa_hi=True)
    ctx = 1 << 20
    d = decode_bytes_per_step(cfg, ctx, 2, 1)
    passes = 38
    assert d["hi"] and d["indexer"] == passes * (ctx / 8 * 128 * 2 + 1024 * 128 * 132)
    off = decode_bytes_per_step(cfg.replace(lsa_hi=False), ctx, 2, 1)
    assert off["indexer"] == passes * ctx * 132 and not off["hi"]
    assert d["ratio"] > 2.5 * off["ratio"]
    short = decode_bytes_per_step(cfg, 200_000, 2, 1)  # under the 256K switch-on length
    assert not short["hi"] and short["indexer"] == passes * 200_000 * 132
