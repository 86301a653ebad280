"""`longcat2.model_dir`: what a `--model` / `--init` argument names, on folders written by the real savers
(`save_pretrained`, the trainer's checkpoints, the sharded DCP checkpoints and their HF export)."""

from __future__ import annotations

import os

import pytest
import torch

from longcat2 import model_dir
from longcat2.config import ModelConfig
from longcat2.model import LongCatForCausalLM
from longcat2.model_dir import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, ModelDirError, resolve_model_dir
from longcat2.parallel.dcp import export_hf, save_sharded
from longcat2.train import run_checkpoint


@pytest.fixture(scope="module")
def model() -> LongCatForCausalLM:
    return LongCatForCausalLM(ModelConfig.from_preset("tiny"))


def test_embedded_model_by_default_and_by_name():
    assert resolve_model_dir(None) == DEFAULT_MODEL_DIR == resolve_model_dir(DEFAULT_MODEL_NAME)
    assert (DEFAULT_MODEL_DIR / "config.json").is_file()


def test_run_folder_means_its_latest_checkpoint(tmp_path, model):
    run = tmp_path / "run"
    for step in (10, 20):
        run_checkpoint.save_checkpoint(run / "checkpoints", step, model, {"step": step}, keep=0)
    (run / "checkpoints" / ".tmp-step_00000030-1").mkdir()  # an interrupted save is not a checkpoint
    latest = run / "checkpoints" / "step_00000020"
    assert resolve_model_dir(run) == latest
    assert resolve_model_dir(run / "checkpoints") == latest
    assert resolve_model_dir(latest) == latest  # a model folder is itself
    assert run_checkpoint.resolve_init(run) == latest


def test_sharded_run_means_its_hf_export_unless_older(tmp_path, model):
    run = tmp_path / "run"
    save_sharded(run / "checkpoints" / "step_00000004", model, extra={"step": 4})
    sharded = run / "checkpoints" / "step_00000004"
    assert resolve_model_dir(run, sharded_ok=True) == sharded  # the trainer's --init reads it
    with pytest.raises(
        ModelDirError, match=r"--model .*latest checkpoint .*step_00000004 is sharded .* export"
    ):
        resolve_model_dir(run)
    with pytest.raises(ModelDirError, match="sharded .* only `longcat2 train/sft --init`"):
        resolve_model_dir(sharded)
    export_hf(model, run / "hf")
    assert resolve_model_dir(run) == run / "hf"
    meta = sharded / model_dir.SHARDED_META
    later = (run / "hf" / "config.json").stat().st_mtime + 10
    os.utime(meta, (later, later))  # the run went on after the export: the export is stale
    with pytest.raises(ModelDirError, match="missing or older"):
        resolve_model_dir(run)


def test_errors_name_the_flag_and_what_was_looked_for(tmp_path, monkeypatch):
    with pytest.raises(ModelDirError, match=r"^--init nope: no such file or directory .*longcat-2.0-tiny"):
        resolve_model_dir("nope", flag="--init")
    with pytest.raises(
        ModelDirError, match=r"not a model folder \(no config.json\) and no checkpoints/step_\*"
    ):
        resolve_model_dir(tmp_path)
    monkeypatch.setattr(model_dir, "DEFAULT_MODEL_DIR", tmp_path / "default-model")
    with pytest.raises(ModelDirError, match="no embedded default model"):
        resolve_model_dir(None)


def test_resolve_config_takes_a_file_or_what_a_model_argument_names(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    assert model_dir.resolve_config(tmp_path / "m" / "config.json") == tmp_path / "m" / "config.json"
    assert model_dir.resolve_config(DEFAULT_MODEL_NAME) == DEFAULT_MODEL_DIR
    assert (
        ModelConfig.from_hf(model_dir.resolve_config(tmp_path / "m")).hidden_size == model.config.hidden_size
    )
    assert torch.equal(
        LongCatForCausalLM.from_pretrained(resolve_model_dir(tmp_path / "m")).lm_head.weight,
        model.lm_head.weight,
    )
