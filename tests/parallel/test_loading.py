"""Sharded loading and FP8-resident weights under real torchrun / gloo processes (pload_worker.py).

A tiny LSA model is saved as sharded bf16 safetensors and exported in the released FP8 layout (our exporter,
`longcat2.model.fp8.export_fp8`). Two ranks (TP2 + EP2 on the same ranks) each read only their slices:
per-rank parameter bytes are about half of one process's for the sharded families, greedy tokens equal
one process's, and the FP8-resident model stays within a stated tolerance of the dequantised checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from longcat2.config import ModelConfig
from longcat2.model.fp8 import BLOCK, FP8Linear, export_fp8, resident_bytes
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.parallel.inference import InferenceLayout, parameter_bytes
from longcat2.parallel.loading import load_for_inference
from longcat2.plan.serve_layout import rank_weight_bytes, sharded_meta_model

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
FP8_TOL = (
    1e-5  # FP8-resident vs the dequantised model (same values, blockwise GEMMs), relative to max |logit|
)


def _save(tmp: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = LongCatForCausalLM(ModelConfig.from_preset("tiny")).eval().to(torch.bfloat16)
    model.save_pretrained(tmp / "bf16", max_shard_size="300KB")
    export_fp8(model, tmp / "fp8", max_shard_size="300KB")
    return tmp / "bf16", tmp / "fp8"


def test_fp8_export_is_the_released_layout(tmp_path: Path) -> None:
    _, fp8 = _save(tmp_path)
    qc = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["weight_block_size"] == list(BLOCK)
    assert "lm_head" in qc["ignored_layers"]
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.self_attn.0.q_b_proj.weight"
    with safe_open(str(fp8 / index[key]), "pt") as f:
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
    with safe_open(str(fp8 / index[key + "_scale_inv"]), "pt") as f:
        assert f.get_tensor(key + "_scale_inv").dtype == torch.float32
    router = "model.layers.0.mlp.router.classifier.weight"
    assert router + "_scale_inv" not in index  # left high precision


def test_fp8_resident_one_process_bytes_and_output(tmp_path: Path) -> None:
    bf16, fp8 = _save(tmp_path)
    kept, _ = load_for_inference(LongCatForCausalLM, fp8, InferenceLayout(), torch.float32, fp8="keep")
    plain, _ = load_for_inference(LongCatForCausalLM, fp8, InferenceLayout(), torch.float32)
    assert any(isinstance(m, FP8Linear) for m in kept.modules())
    b, p = parameter_bytes(kept), parameter_bytes(plain)
    # what `longcat2 info` / `plan --serve` count (fp32 high-precision parts here) is what was loaded
    with torch.device("meta"):
        meta = LongCatForCausalLM(ModelConfig.from_preset("tiny"))
    assert resident_bytes(meta, fp8=True, dtype_bytes=4)["total"] == b["total"]
    assert resident_bytes(meta, fp8=False, dtype_bytes=4)["total"] == p["total"]
    # the quantised weights: 1 byte per value + fp32 block scales, vs 2 bytes in bf16
    assert 0.5 <= (b["float8"] + b["float8_scales"]) / (2 * b["float8"]) < 0.52
    assert b["total"] < p["total"]
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, ref = kept(ids), plain(ids)
    assert (a - ref).abs().max() <= FP8_TOL * ref.abs().max()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_two_ranks_read_their_slices_bf16_and_fp8(tmp_path: Path) -> None:
    bf16, fp8 = _save(tmp_path)
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]), env.get("PYTHONPATH")]))
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--monitor-interval=0.2",
           str(HERE / "pload_worker.py"), "--bf16", str(bf16), "--fp8", str(fp8), "--tp", "2", "--ep", "2",
           "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=HERE.parents[1])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    assert p.stdout.count("peak RSS growth while loading") == 4, p.stdout  # printed by every rank, twice
    rec = json.loads(out.read_text())
    for name in ("bf16", "fp8"):
        r = rec[name]
        assert r["tokens"] == r["ref_tokens"], name
        assert r["logit_diff"] <= 1e-5
        one = r["full_bytes"]
        for rank in r["ranks"]:
            b = rank["bytes"]
            assert b["total"] == b["sharded"] + b["replicated"]
            assert b["total"] < 0.6 * one, (
                name,
                b,
                one,
            )  # half of the sharded families + the replicated rest
            assert rank["read"] < 0.6 * sum(x["read"] for x in r["ranks"]) and rank["rss"] >= 0
    assert rec["fp8"]["dequantised_diff"] <= FP8_TOL * rec["fp8"]["logit_scale"]
    # `longcat2 plan --serve` counts the same per-rank bytes as were measured (fp32 high-precision parts here)
    cfg = ModelConfig.from_hf(bf16)
    for rank in (0, 1):
        meta = sharded_meta_model(cfg, 2, 2, rank)
        for name, fp8_resident in (("bf16", False), ("fp8", True)):
            planned = rank_weight_bytes(meta, fp8=fp8_resident, dtype_bytes=4)
            assert planned["total"] == rec[name]["ranks"][rank]["bytes"]["total"], (name, rank)
