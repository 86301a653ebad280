"""HF checkpoint interop: parity with transformers both ways, round trips, sharding, FP8, errors, atomic saves."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hf_reference import legacy_zero_expert_layout, random_longcat_flash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import longcat2.hf_checkpoint as ckpt
from longcat2.config import ConfigError, ModelConfig
from longcat2.hf_checkpoint import CheckpointError, dequantize_fp8_blockwise
from longcat2.model.longcat import LongCatForCausalLM

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


# ---------------------------------------------------------------------- helpers


def _model(preset: str, **overrides) -> LongCatForCausalLM:
    m = LongCatForCausalLM(ModelConfig.from_preset(preset, **overrides)).eval()
    with torch.no_grad():
        for name, buf in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)  # non-zero: must survive the round trip
    return m


def _ids(cfg: ModelConfig, t: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, cfg.vocab_size, (2, t), generator=g)


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys |= set(h.keys())
    return keys


def _rewrite(folder: Path, edit) -> None:
    """Apply `edit(dict)` to the tensors of a single-file checkpoint."""
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["plain", "yarn"])
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, rope_scaling):
    transformers, cfg, hf = random_longcat_flash(rope_scaling)
    hf.save_pretrained(tmp_path / "hf")
    ours = LongCatForCausalLM.from_pretrained(tmp_path / "hf")  # strict
    assert ours.config == cfg
    ids = _ids(cfg, 40)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    rep = ours.load_report
    assert not rep.missing and not rep.unexpected
    assert rep.mtp_initialised  # transformers drops the MTP head; ours is freshly initialised
    e, z = cfg.n_routed_experts, cfg.zero_expert_num
    zero_keys = [k for k in rep.ignored if any(f".experts.{x}." in k for x in range(e, e + z))]
    if legacy_zero_expert_layout(transformers):
        assert zero_keys  # transformers < 5.25 writes zero-expert gate/up; they are skipped
    else:
        assert not rep.ignored  # >= 5.25 writes the released layout: nothing to skip
    mtp = ours.model.mtp
    assert torch.equal(mtp.norm.weight, torch.ones_like(mtp.norm.weight))
    std = mtp.layers[0].eh_proj.weight.std().item()
    assert 0.01 < std < 0.03  # init_weights' N(0, initializer_range)
    out = ours(ids, return_dict=True, with_mtp=True)
    assert torch.isfinite(out.mtp_logits[0]).all()


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["plain", "yarn"])
def test_our_checkpoint_loads_in_transformers(tmp_path, rope_scaling):
    transformers, cfg, hf = random_longcat_flash(rope_scaling)
    hf.save_pretrained(tmp_path / "hf")
    ours = LongCatForCausalLM.from_pretrained(tmp_path / "hf")
    # the default (released) layout for transformers >= 5.25; older releases need the zero-expert tensors
    ours.save_pretrained(tmp_path / "ours", transformers_compat=legacy_zero_expert_layout(transformers))
    back = transformers.LongcatFlashForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = _ids(cfg, 40)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(back(ids).logits, ours(ids), rtol=0, atol=1e-4)


def test_transformers_key_quirks(tmp_path):
    """What transformers writes: no MTP; the zero experts' gate/up (no down) before 5.25, the released layout
    (routed experts only) from 5.25 on. Our default save is the released layout, `transformers_compat=True`
    the pre-5.25 one; both load back to the same state."""
    transformers, cfg, hf = random_longcat_flash(None)
    hf.save_pretrained(tmp_path / "hf")
    hf_keys = _keys(tmp_path / "hf")
    e, z = cfg.n_routed_experts, cfg.zero_expert_num
    legacy = legacy_zero_expert_layout(transformers)
    for x in range(e, e + z):
        assert (f"model.layers.0.mlp.experts.{x}.gate_proj.weight" in hf_keys) == legacy
        assert (f"model.layers.0.mlp.experts.{x}.up_proj.weight" in hf_keys) == legacy
        assert f"model.layers.0.mlp.experts.{x}.down_proj.weight" not in hf_keys
    assert not any(k.startswith("model.mtp.") for k in hf_keys)

    ours = LongCatForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "compat", transformers_compat=True)
    ours.save_pretrained(tmp_path / "released")  # the default
    compat, released = _keys(tmp_path / "compat"), _keys(tmp_path / "released")
    zero_gate_up = {
        f"model.layers.{i}.mlp.experts.{x}.{p}.weight"
        for i in range(cfg.num_layers)
        for x in range(e, e + z)
        for p in ("gate_proj", "up_proj")
    }
    assert compat - released == zero_gate_up
    assert {k for k in released if not k.startswith("model.mtp.")} == hf_keys - zero_gate_up
    assert any(k.startswith("model.mtp.") for k in released)
    zero = load_file(str(tmp_path / "compat" / "model.safetensors"))[
        f"model.layers.1.mlp.experts.{e}.up_proj.weight"
    ]
    assert not zero.any()
    for folder in ("released", "compat"):  # older transformers' files keep loading
        again = LongCatForCausalLM.from_pretrained(tmp_path / folder)
        _assert_same_state(ours, again)
    assert sorted(again.load_report.ignored) == sorted(zero_gate_up)


# ---------------------------------------------------------------------- round trips


def test_roundtrip_longcat2_format(tmp_path):
    m = _model("tiny")
    m.save_pretrained(tmp_path / "ck")
    keys = _keys(tmp_path / "ck")
    t = m.config.ngram_num_tables
    assert {f"model.oe_embed_tokens{i}.weight" for i in range(t)} <= keys
    assert {f"model.oe_embed_proj{i}.weight" for i in range(t)} <= keys
    assert not any("ngram_embeddings" in k for k in keys)
    assert "model.layers.0.self_attn.0.indexer.wq_b.weight" in keys
    assert "model.layers.0.self_attn.1.indexer.wq_b.weight" not in keys
    assert "model.mtp.layers.0.eh_proj.weight" in keys and "model.mtp.embed_tokens.weight" in keys
    assert f"model.layers.1.mlp.experts.{m.config.n_routed_experts - 1}.down_proj.weight" in keys
    assert not any(f"experts.{m.config.n_routed_experts}." in k for k in keys)  # released layout
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["architectures"] == ["LongcatCausalLM"]

    back = LongCatForCausalLM.from_pretrained(tmp_path / "ck")
    assert back.config == m.config
    assert "every tensor matched" in str(back.load_report)
    _assert_same_state(m, back)
    ids = _ids(m.config, 80)  # > index_topk: the sparse path is active
    with torch.no_grad():
        assert torch.equal(m(ids), back(ids))


def test_roundtrip_flash_lite_format_and_both_ngram_spellings(tmp_path):
    m = _model("tiny-flash-lite")
    m.save_pretrained(tmp_path / "ck")
    keys = _keys(tmp_path / "ck")
    assert "model.ngram_embeddings.embedders.0.weight" in keys
    assert "model.ngram_embeddings.post_projs.0.weight" in keys
    assert not any("oe_embed" in k for k in keys)
    back = LongCatForCausalLM.from_pretrained(tmp_path / "ck")
    _assert_same_state(m, back)
    ids = _ids(m.config)
    with torch.no_grad():
        assert torch.equal(m(ids), back(ids))

    def respell(t):  # the LongCat-2.0 spelling, and transformers' shared word-embedding name
        for k in [k for k in t if "ngram_embeddings." in k]:
            i = k.split(".")[-2]
            new = (
                f"model.oe_embed_tokens{i}.weight" if ".embedders." in k else f"model.oe_embed_proj{i}.weight"
            )
            t[new] = t.pop(k)
        t["model.ngram_embeddings.word_embeddings.weight"] = t.pop("model.embed_tokens.weight")

    _rewrite(tmp_path / "ck", respell)
    _assert_same_state(m, LongCatForCausalLM.from_pretrained(tmp_path / "ck"))


def test_sharded_save_and_load(tmp_path):
    m = _model("tiny")
    m.save_pretrained(tmp_path / "ck", max_shard_size="60KB")
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert len(shards) > 3 and "model.safetensors" not in shards
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == _keys(tmp_path / "ck")
    sizes = {s: (tmp_path / "ck" / s).stat().st_size for s in shards}
    assert index["metadata"]["total_size"] <= sum(sizes.values())
    back = LongCatForCausalLM.from_pretrained(tmp_path / "ck")
    _assert_same_state(m, back)
    # re-saving as one file replaces the shards (no stale files left behind)
    back.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_state(m, LongCatForCausalLM.from_pretrained(tmp_path / "ck"))


def test_dtype_on_load_keeps_router_fp32(tmp_path):
    m = _model("tiny-flash")
    m.save_pretrained(tmp_path / "ck")
    back = LongCatForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16, device="cpu")
    router = back.model.layers[0].mlp.router
    assert router.classifier.weight.dtype == torch.float32
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, m.model.layers[0].mlp.router.e_score_correction_bias)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert back.model.layers[0].mlp.experts.gate_proj.dtype == torch.bfloat16
    back.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = LongCatForCausalLM.from_pretrained(tmp_path / "bf16")  # dtype from config.json
    assert again.lm_head.weight.dtype == torch.bfloat16
    _assert_same_state(back, again)


def test_load_builds_on_meta_and_keeps_ties(tmp_path, monkeypatch):
    m = _model("tiny-flash", tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    m.save_pretrained(tmp_path / "ck")
    keys = _keys(tmp_path / "ck")
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys

    def no_full_init(self):
        raise AssertionError("a complete checkpoint must not be randomly initialised first")

    monkeypatch.setattr(LongCatForCausalLM, "init_weights", no_full_init)
    back = LongCatForCausalLM.from_pretrained(tmp_path / "ck")
    assert not any(p.is_meta for p in back.parameters())
    assert not any(b.is_meta for b in back.buffers())
    assert back.lm_head.weight is back.model.embed_tokens.weight
    _assert_same_state(m, back)
    # a file that also carries the tied duplicate loads and reports it as ignored
    _rewrite(tmp_path / "ck", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    again = LongCatForCausalLM.from_pretrained(tmp_path / "ck")
    assert "lm_head.weight" in again.load_report.ignored and not again.load_report.incomplete


# ---------------------------------------------------------------------- FP8


def _quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = w.shape
    rows, cols = math.ceil(out_f / block), math.ceil(in_f / block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out_f, :in_f] = w.float()
    tiles = padded.view(rows, block, cols, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(rows * block, cols * block)[:out_f, :in_f].contiguous(), scale


def test_dequantize_fp8_blockwise_edges():
    w = torch.randn(300, 200)
    q, s = _quantize_fp8(w)
    assert s.shape == (3, 2)
    got = dequantize_fp8_blockwise(q, s)
    ref = q.float().clone()
    for i in range(3):
        for j in range(2):
            ref[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= s[i, j]
    assert torch.equal(got, ref)
    assert (got - w).abs().max() <= 0.07 * w.abs().max()
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_fp8_blockwise(q, s[:2])


def test_fp8_block_quantised_checkpoint(tmp_path):
    m = _model("tiny-flash", hidden_size=192, ffn_hidden_size=160)  # several blocks, ragged edges
    m.save_pretrained(tmp_path / "ck", transformers_compat=False)
    skip = ("embed_tokens", "lm_head", "norm", "router")
    quantised: list[str] = []

    def quantise(t):
        for k in [
            k for k in t if k.endswith(".weight") and t[k].dim() == 2 and not any(s in k for s in skip)
        ]:
            t[k], t[k + "_scale_inv"] = _quantize_fp8(t[k])
            quantised.append(k)

    _rewrite(tmp_path / "ck", quantise)
    cfg_path = tmp_path / "ck" / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    cfg_path.write_text(json.dumps(raw))

    back = LongCatForCausalLM.from_pretrained(tmp_path / "ck")
    assert sorted(back.load_report.dequantised) == sorted(quantised)
    assert any(".experts.0.gate_proj" in k for k in quantised)
    orig = dict(m.named_parameters())
    for name, p in back.named_parameters():
        o = orig[name]
        assert p.dtype == o.dtype == torch.float32
        err = (p - o).abs()
        # e4m3: 3 mantissa bits → relative error <= 2^-4, plus the subnormal floor of each block's scale
        assert (err <= o.abs() * 2**-4 + o.abs().max() / 448 * 2**-9 + 1e-7).all(), name
    ids = _ids(m.config)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m(ids), rtol=0, atol=0.1)

    # a float8 weight without its scale is an error naming the key
    _rewrite(tmp_path / "ck", lambda t: t.pop("model.layers.0.mlps.0.up_proj.weight_scale_inv"))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlps\.0\.up_proj\.weight.*weight_scale_inv"
    ):
        LongCatForCausalLM.from_pretrained(tmp_path / "ck")


# ---------------------------------------------------------------------- errors


@pytest.fixture
def flash_ck(tmp_path) -> tuple[LongCatForCausalLM, Path]:
    m = _model("tiny-flash")
    m.save_pretrained(tmp_path / "ck", transformers_compat=False)
    return m, tmp_path / "ck"


def test_missing_key(flash_ck):
    _, path = flash_ck
    _rewrite(path, lambda t: t.pop("model.layers.1.mlps.0.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.mlps\.0\.up_proj\.weight"):
        LongCatForCausalLM.from_pretrained(path)


def test_missing_expert_slice(flash_ck):
    _, path = flash_ck
    _rewrite(path, lambda t: t.pop("model.layers.0.mlp.experts.3.down_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing model\.layers\.0\.mlp\.experts\.3\.down_proj\.weight"
    ):
        LongCatForCausalLM.from_pretrained(path)


def test_unexpected_key(flash_ck):
    _, path = flash_ck
    _rewrite(path, lambda t: t.update({"model.layers.0.bogus.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected model\.layers\.0\.bogus\.weight"):
        LongCatForCausalLM.from_pretrained(path)
    # an expert index past routed + zero experts is unexpected too
    _rewrite(
        path,
        lambda t: (
            t.pop("model.layers.0.bogus.weight"),
            t.update({"model.layers.0.mlp.experts.99.up_proj.weight": torch.zeros(32, 64)}),
        ),
    )
    with pytest.raises(
        CheckpointError, match=r"unexpected model\.layers\.0\.mlp\.experts\.99\.up_proj\.weight"
    ):
        LongCatForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("strict", [True, False])
def test_wrong_shape_names_key_and_both_shapes(flash_ck, strict):
    _, path = flash_ck
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.experts.5.gate_proj.weight": torch.zeros(33, 64)}))
    with pytest.raises(CheckpointError) as err:
        LongCatForCausalLM.from_pretrained(path, strict=strict)
    msg = str(err.value)
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in msg and "(33, 64)" in msg and "(32, 64)" in msg
    assert isinstance(err.value, ValueError)


def test_non_strict_reports_and_initialises(flash_ck):
    m, path = flash_ck

    def edit(t):
        t.pop("model.layers.1.mlps.0.up_proj.weight")
        t.pop("model.layers.0.mlp.experts.2.up_proj.weight")
        t["model.extra.weight"] = torch.zeros(2)

    _rewrite(path, edit)
    back = LongCatForCausalLM.from_pretrained(path, strict=False)
    rep = back.load_report
    assert set(rep.missing) == {
        "model.layers.1.mlps.0.up_proj.weight",
        "model.layers.0.mlp.experts.2.up_proj.weight",
    }
    assert rep.unexpected == ["model.extra.weight"]
    assert "model.extra.weight" in str(rep) and rep.incomplete
    fresh = back.model.layers[1].mlps[0].up_proj.weight
    assert torch.isfinite(fresh).all() and 0.01 < fresh.std().item() < 0.03
    experts = back.model.layers[0].mlp.experts.up_proj
    ref = m.model.layers[0].mlp.experts.up_proj
    for e in range(m.config.n_routed_experts):  # the other experts' slices were kept
        assert torch.equal(experts[e], ref[e]) == (e != 2)
    assert torch.equal(back.model.norm.weight, m.model.norm.weight)


def test_missing_files_and_bad_config(tmp_path, flash_ck):
    m, path = flash_ck
    with pytest.raises(ConfigError, match="config.json"):
        LongCatForCausalLM.from_pretrained(tmp_path / "nowhere")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        LongCatForCausalLM.from_pretrained(path)
    bad = m.config.to_hf() | {"hidden_size": -4}
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="hidden_size"):
        LongCatForCausalLM.from_pretrained(path)
    (path / "config.json").write_text(json.dumps(m.config.to_hf()))
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LongCatForCausalLM.from_pretrained(path)
    m.save_pretrained(path, max_shard_size="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        LongCatForCausalLM.from_pretrained(path)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = _model("tiny-flash")
    path = tmp_path / "ck"
    old.save_pretrained(path, max_shard_size="40KB")
    (path / "tokenizer.json").write_text("{}")  # not ours: must survive every save
    ids = _ids(old.config)
    with torch.no_grad():
        want = old(ids)

    new = _model("tiny-flash")
    calls = []
    real = ckpt._write_shard

    def flaky(tensors, file, metadata):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, file, metadata)

    monkeypatch.setattr(ckpt, "_write_shard", flaky)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(path, max_shard_size="40KB")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or backup folder left behind
    back = LongCatForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(back(ids), want)

    monkeypatch.setattr(ckpt, "_write_shard", real)
    new.save_pretrained(path)
    assert (path / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    _assert_same_state(new, LongCatForCausalLM.from_pretrained(path))


def test_parse_size():
    assert ckpt.parse_size("5GB") == 5 * 10**9
    assert ckpt.parse_size("2GiB") == 2 * 2**30
    assert ckpt.parse_size("100KB") == 100_000
    assert ckpt.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        ckpt.parse_size("lots")


def test_saved_files_follow_the_umask(tmp_path, umask_027):
    # safetensors writes through a 0600 temporary file; a checkpoint must be readable as the umask allows
    m = _model("tiny")
    m.save_pretrained(tmp_path / "one")
    m.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    (tmp_path / "one" / "README.md").write_text("kept\n")
    m.save_pretrained(tmp_path / "one")  # a re-save keeps the files it carries over as they were
    for folder in ("one", "sharded"):
        umask_027(tmp_path / folder)


# ---------------------------------------------------------------------- hardening (issue 20)


def test_integer_weights_are_an_error_not_silently_cast(flash_ck):
    """An all-int8 model.safetensors used to load "with every tensor matched" (values cast to float)."""
    _, path = flash_ck
    _rewrite(path, lambda t: t.update({k: v.to(torch.int8) for k, v in t.items()}))
    with pytest.raises(CheckpointError, match=r"stored as torch\.int8 in model\.safetensors.*floating-point"):
        LongCatForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="int8"):
        LongCatForCausalLM.from_pretrained(path, strict=False)


def test_strict_load_refuses_a_partly_missing_mtp_head(flash_ck):
    m, path = flash_ck
    key = "model.mtp.embed_tokens.weight"
    assert key in _keys(path)
    _rewrite(path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing {re.escape(key)}"):
        LongCatForCausalLM.from_pretrained(path)
    back = LongCatForCausalLM.from_pretrained(path, strict=False)  # non-strict: reported, initialised
    assert key in back.load_report.missing
    # a wholly absent MTP head (transformers drops it) stays tolerated, and reported
    _rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.mtp.")])
    back = LongCatForCausalLM.from_pretrained(path)
    assert key in back.load_report.mtp_initialised and not back.load_report.missing


def test_config_json_of_the_wrong_shape_names_the_file_and_key(flash_ck):
    m, path = flash_ck
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object, got a JSON list") as err:
        LongCatForCausalLM.from_pretrained(path)
    assert str(path / "config.json") in str(err.value)
    (path / "config.json").write_text(json.dumps(m.config.to_hf() | {"hidden_size": None}))
    with pytest.raises(ConfigError, match="hidden_size: null in config.json; expected an integer"):
        LongCatForCausalLM.from_pretrained(path)
    (path / "config.json").write_text(json.dumps(m.config.to_hf() | {"rms_norm_eps": None}))
    with pytest.raises(ConfigError, match="rms_norm_eps: null"):
        LongCatForCausalLM.from_pretrained(path)


def test_index_entry_pointing_at_the_wrong_shard_names_key_and_file(flash_ck):
    m, path = flash_ck
    (path / "model.safetensors").unlink()
    m.save_pretrained(path, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][key] = shards[1]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        LongCatForCausalLM.from_pretrained(path)
    assert key in str(err.value) and shards[1] in str(err.value)
