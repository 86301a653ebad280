"""Pre-training loop: loss falls, outputs, budget control in training, non-finite handling, atomic
checkpoints, resume rules, CLI parsing."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from longcat2.model import LongCatForCausalLM
from longcat2.train import run_checkpoint
from longcat2.train.cli import add_cli, config_from_args
from longcat2.train.config import TrainConfig, TrainingError
from longcat2.train.metrics import read_metrics
from longcat2.train.trainer import Trainer


def _cfg(prepared, out, **kw) -> TrainConfig:
    base = dict(
        data=str(prepared), out=str(out), steps=20, batch_size=4, seq_len=64, lr=3e-3, warmup=3,
        precision="fp32", progress=False, plot=False, save_every=10, eval_every=10, eval_batches=2,
        mtp_weight=0.1, deterministic=True,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg: TrainConfig) -> tuple[Trainer, list[dict]]:
    t = Trainer(cfg)
    assert t.train() == 0
    return t, read_metrics(cfg.out + "/metrics.jsonl")


def test_tiny_run_loss_falls_and_writes_everything(prepared, tmp_path, umask_027):
    cfg = _cfg(prepared, tmp_path / "run", steps=30, plot=True, target_ffn_experts=1.0)
    t, recs = _train(cfg)
    train = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 31))
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0 < evals[-1]["val_bpb"] < 10
    for key in ("lr", "grad_norm", "tokens_per_s", "mtp_loss", "z_loss", "ffn_experts_per_token", "router_entropy",
                "expert_load", "expert_load_max"):  # fmt: skip
        assert key in train[-1], key
    # budget control during training: FFN experts per token driven from ~2 towards the target 1.0
    late = sum(r["ffn_experts_per_token"] for r in train[-5:]) / 5
    assert abs(late - 1.0) < abs(train[0]["ffn_experts_per_token"] - 1.0)
    assert abs(late - 1.0) < 0.35, late
    # outputs
    out = tmp_path / "run"
    assert (out / "loss.png").stat().st_size > 1000
    ckpts = run_checkpoint.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in ckpts] == [20, 30]  # keep_checkpoints=2
    latest = ckpts[-1][1]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"):
        assert (latest / name).is_file(), name
    loaded = LongCatForCausalLM.from_pretrained(latest, dtype=torch.float32)
    for (n, a), b in zip(t.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n  # weights and the routing bias buffers
    st = run_checkpoint.load_trainer_state(latest)
    assert st["step"] == 30 and "optimizer" in st and "rng" in st and "data" in st
    umask_027(
        out
    )  # checkpoints, metrics and plot readable as the umask allows (safetensors' temp file is 0600)


def test_nonfinite_steps_are_skipped_then_abort(prepared, tmp_path, monkeypatch):
    cfg = _cfg(prepared, tmp_path / "nan", steps=12, max_nonfinite=3, save_every=0, eval_every=0)
    t = Trainer(cfg)
    real = t.forward_loss
    bad_steps = {2, 3, 6, 7, 8, 9}  # 0-based step index during which the loss is NaN

    def poisoned(x, y):
        loss, parts, n = real(x, y)
        if t.step in bad_steps:
            loss = loss * float("nan")
        return loss, parts, n

    monkeypatch.setattr(t, "forward_loss", poisoned)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    assert t.train() == 3
    recs = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    skipped = [r["step"] for r in recs if r.get("skipped")]
    assert skipped == [3, 4, 7, 8, 9]  # stopped at the third in a row
    assert t.nonfinite_total == 5 and t.step == 9
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())


def test_checkpoint_write_is_atomic_when_interrupted(prepared, tmp_path, monkeypatch):
    out = tmp_path / "atomic"
    cfg = _cfg(prepared, out, steps=8, save_every=4, eval_every=0)
    t = Trainer(cfg)
    calls = {"n": 0}
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # the second checkpoint dies half-way through its last file
        calls["n"] += 1
        if calls["n"] == 2:
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise KeyboardInterrupt  # an interruption the trainer does not checkpoint
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(run_checkpoint.torch, "save", dying_save)
    assert t.train() == 130
    root = out / "checkpoints"
    assert [s for s, _ in run_checkpoint.list_checkpoints(root)] == [4]  # the last good one, intact
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the partial write, hidden
    assert run_checkpoint.load_trainer_state(root / "step_00000004")["step"] == 4
    monkeypatch.setattr(run_checkpoint.torch, "save", real_save)
    # resume: leftovers removed, continues from step 4, metrics cut back to it
    t2 = Trainer(_cfg(prepared, out, steps=8, save_every=4, eval_every=0, resume=True))
    assert t2.step == 4
    assert not any(p.name.startswith(".") for p in root.iterdir())
    assert t2.train() == 0
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, 9))


def test_resume_rules(prepared, tmp_path):
    out = tmp_path / "rules"
    _train(_cfg(prepared, out, steps=2, save_every=0, eval_every=0))
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(_cfg(prepared, out, steps=4))
    with pytest.raises(TrainingError, match="--lr"):
        Trainer(_cfg(prepared, out, steps=4, lr=1.0, resume=True), explicit={"lr", "steps", "resume"})
    t = Trainer(_cfg(prepared, out, steps=4, resume=True), explicit={"steps", "resume"})
    assert t.step == 2 and t.cfg.steps == 4
    assert t.train() == 0


def test_cli_parsing():
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "train",
            "--preset",
            "tiny",
            "--steps",
            "7",
            "--no-progress",
            "--deterministic",
            "--model",
            "hidden_size=128",
        ]
    )
    cfg, explicit = config_from_args(args, "pretrain")
    assert cfg.steps == 7 and cfg.progress is False and cfg.deterministic is True
    assert cfg.model_overrides == {"hidden_size": 128}
    assert explicit == {"preset", "steps", "progress", "deterministic", "model_overrides"}
    assert cfg.lr == TrainConfig().lr
    args = parser.parse_args(["sft", "--data", "x.jsonl", "--init", "runs/a"])
    cfg, _ = config_from_args(args, "sft")
    assert cfg.mode == "sft" and cfg.out == "runs/sft" and cfg.init == "runs/a"


def test_metrics_lines_are_json(prepared, tmp_path):
    _train(_cfg(prepared, tmp_path / "j", steps=2, save_every=0, eval_every=0))
    for line in (tmp_path / "j" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_activation_checkpointing_and_balance_loss_match_plain(prepared, tmp_path):
    sigs = []
    for gc in (False, True):
        cfg = _cfg(prepared, tmp_path / f"gc{gc}", steps=3, save_every=0, eval_every=0, balance_loss=0.01)
        cfg.grad_checkpointing = gc
        _, recs = _train(cfg)
        sigs.append([(r["loss"], r["balance_loss"], r["grad_norm"]) for r in recs if r["type"] == "train"])
    assert sigs[0] == sigs[1]
