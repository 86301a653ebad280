"""The training loop behind `longcat2 train` (pre-training) and `longcat2 sft` (chat fine-tuning).

The loop's neighbours: `task.py` (what it trains on: the Task protocol, pre-training shards, the choice
of task), `loss.py` (masked CE and the typed loss parts), `env.py` (precision, determinism, CPU heap),
`metrics.py` (metrics.jsonl and loss.png), `run_checkpoint.py` (the step_* directories), `optim.py`,
`balance.py`, `sparse.py`.

Design choices:
- One `Trainer` for both modes; a task object (`task.py`) supplies batches, evaluation batches, its
  resumable data position and the tokenizer.
- One optimizer step = `grad_accum` micro-batches. The loss is the sum of weighted parts (`loss.py`: CE,
  MTP, z-loss, balance loss, LSA indexer KL with dense rows for the first `indexer_warmup` steps, then the
  selected set); each part travels as a `LossParts` field into the step's metrics. After the step, the
  expert-bias controller (balance.py) updates `e_score_correction_bias` from the step's routing counts.
- Precision and process set-up (`env.py`): fp32 master weights, bf16 autocast where it is fast (`auto`),
  glibc heap tuning on CPU.
- Non-finite loss or gradient norm: the step is skipped (grads dropped, no optimizer/bias update, the data
  still advances), counted (`skipped` in metrics.jsonl) and the run aborts with a clear message after
  `max_nonfinite` in a row.
- Exact resume: everything the next step depends on is in the checkpoint — weights and the routing bias
  (model files), optimizer moments, step counter (the LR schedule is a function of it), sampler position,
  torch/numpy/python RNG states and counters. With `--deterministic` on CPU (deterministic algorithms,
  fixed thread count, fp32 or bf16 autocast: both are deterministic kernels) a run killed with SIGKILL at
  any point and resumed writes the same per-step losses, bit for bit, as an uninterrupted run. On
  resume metrics.jsonl is cut back to the checkpoint's step, so it reads as one run.
- SIGINT/SIGTERM stop cleanly after the current step: it is checkpointed and the command exits with
  status 130 (a second signal stops at once, without a save).
- Scale-out (`torchrun --nproc_per_node=N -m longcat2 train ... --ep E`, docs/distributed.md): the
  process group, device and ("dp", "ep") mesh come from `longcat2.parallel.init_distributed` (one process:
  no group, device from --device or `torch.accelerator`). With more than one rank the model is
  `parallel.parallelize`d (routed experts split over `ep` with all-to-all dispatch, FSDP2 for the rest)
  before the optimizer is built; each rank reads its slice of the global batch (batch_size is per rank),
  FSDP averages gradients, `parallel.clip_grad_norm_` takes the norm across both meshes, routing counts are
  summed over ranks for the bias update, a stop signal is agreed on by all ranks, and only rank 0 writes
  metrics. Checkpoints are then sharded (`parallel.save_sharded`: DCP, any world size on resume, optimizer
  included) and the run ends with a full HF export in OUT/hf. Resume works across world sizes in both
  directions: a sharded checkpoint on one process (it keeps writing sharded ones), a one-process checkpoint
  on N ranks (the optimizer moments restart: the HF-layout state is per process, not sharded).
  --batch-size and --grad-accum may change on resume, to keep the global batch (batch_size x grad_accum x
  ranks) at another world size.
- Outputs under OUT: metrics.jsonl (one `train` line per step, `eval` lines with val loss and bits per
  byte) and loss.png (see metrics.py), checkpoints/step_XXXXXXXX (see run_checkpoint.py), train_config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcat2 import parallel
from longcat2.config import ModelConfig
from longcat2.model import LongCatForCausalLM
from longcat2.model_dir import ModelDirError
from longcat2.train import balance, run_checkpoint
from longcat2.train.config import RESUME_MUTABLE, TrainConfig, TrainingError
from longcat2.train.env import resolve_precision, setup_determinism, tune_cpu_allocator
from longcat2.train.loss import LossParts, first_token_ce, masked_ce
from longcat2.train.metrics import plot_metrics, read_metrics, truncate_metrics
from longcat2.train.optim import MuonAdamW, Schedule, apply_schedule, param_groups_for
from longcat2.train.task import make_task

__all__ = ["Trainer", "run"]


class Trainer:
    def __init__(self, cfg: TrainConfig, explicit: set[str] | None = None) -> None:
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.resume_from: Path | None = None
        skipped: list[str] = []
        if cfg.resume:
            self.resume_from, skipped = run_checkpoint.latest_good_checkpoint(self.ckpt_root)
            if skipped and self.resume_from is None:
                raise TrainingError(
                    "--resume: no readable checkpoint in "
                    f"{self.ckpt_root}: " + "; ".join(skipped) + " (move them away to start afresh)"
                )
            if self.resume_from is not None:
                cfg = self._merge_resumed_config(cfg, explicit)
        elif run_checkpoint.latest_checkpoint(self.ckpt_root) is not None:
            raise TrainingError(
                f"{self.out} already holds checkpoints; pass --resume to continue that run or choose another --out"
            )
        self.cfg = cfg
        try:
            self.dist = parallel.init_distributed(ep=cfg.ep, device=cfg.device)  # "auto": torch.accelerator
        except parallel.ParallelConfigError as e:
            raise TrainingError(str(e)) from e
        self.rank, self.world, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.main = self.rank == 0
        for why in skipped:
            self._log(f"warning: resume skips a checkpoint that cannot be read back: {why}")
        self.sharded = self.world > 1  # the model is parallelized (FSDP2 + EP)
        self.resume_sharded = self.resume_from is not None and run_checkpoint.is_sharded(self.resume_from)
        self.sharded_checkpoints = self.sharded or self.resume_sharded
        if self.device.type == "cpu":
            tune_cpu_allocator()
        setup_determinism(cfg.deterministic, cfg.threads)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        import random

        random.seed(cfg.seed)

        self.task = make_task(cfg, self.rank, self.world)
        self.model = self._make_model().to(self.device)
        self.model.train()
        if cfg.grad_checkpointing:
            self.model.model.gradient_checkpointing = True
        if cfg.attention == "dense":
            from longcat2.model.attention import set_sparse_attention

            set_sparse_attention(self.model, False)
        if cfg.train_only == "indexer":
            for name, p in self.model.named_parameters():
                p.requires_grad_(".indexer." in name)
            if not any(p.requires_grad for p in self.model.parameters()):
                raise TrainingError(
                    "train_only: indexer, but the model has no LSA indexer (index_n_heads is 0)"
                )
        if self.sharded:
            try:
                parallel.parallelize(self.model, self.dist.mesh, ep=cfg.ep)
            except parallel.ParallelConfigError as e:
                raise TrainingError(str(e)) from e
        self.moes = balance.moe_layers(self.model)
        self.distiller = None
        if cfg.indexer_loss > 0 and self.model.config.use_lsa:
            from longcat2.train.sparse import IndexerDistiller

            self.distiller = IndexerDistiller(self.model, cross_layer_target=cfg.indexer_cross_layer)
        self.stats = balance.RoutingStats.for_model(self.moes) if self.moes else None
        mc = self.model.config
        target = cfg.target_ffn_experts
        if target is None:
            target = balance.default_target(mc.moe_topk, mc.n_routed_experts)
        self.controller = balance.BudgetController(target=target, rate=cfg.bias_update_rate)
        groups = param_groups_for(
            self.model, cfg.lr, cfg.muon_lr, cfg.weight_decay, use_muon=cfg.optimizer == "muon"
        )
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = MuonAdamW(
            groups,
            momentum=cfg.momentum,
            ns_steps=cfg.ns_steps,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.adam_eps,
        )
        self.schedule = Schedule(cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.elapsed = 0.0
        self.last_saved = -1
        self._stop_requested: str | None = None
        if self.resume_from is not None:
            self._load_state(self.resume_from)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            removed = parallel.remove_partial(self.ckpt_root)
            if removed:
                self._log(f"removed partial checkpoint writes: {', '.join(removed)}")
            if self.metrics_path.exists():
                truncate_metrics(self.metrics_path, self.step)
            (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        parallel.barrier()

    # ------------------------------------------------------------------ setup
    def _log(self, msg: str) -> None:
        if self.main:
            print(msg, file=sys.stderr, flush=True)

    def _merge_resumed_config(self, cfg: TrainConfig, explicit: set[str] | None) -> TrainConfig:
        """The checkpoint's run config, with the resume-mutable fields taken from `cfg`. A field given
        explicitly (`explicit`; None = every field, for API callers) that differs and is not mutable is an
        error rather than being silently ignored."""
        assert self.resume_from is not None
        saved_json = self.resume_from / "train_config.json"
        if saved_json.is_file():
            saved = json.loads(saved_json.read_text())
        elif run_checkpoint.is_sharded(self.resume_from):
            saved = parallel.load_extra(self.resume_from)["config"]
        else:
            saved = run_checkpoint.load_trainer_state(self.resume_from)["config"]
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        base = TrainConfig(**{k: v for k, v in saved.items() if k in known})
        names = known if explicit is None else explicit
        changed = []
        for name in sorted(names):
            new, old = getattr(cfg, name), getattr(base, name)
            if name in RESUME_MUTABLE:
                setattr(base, name, new)
            elif new != old:
                changed.append(f"--{name.replace('_', '-')} {new!r} (checkpoint has {old!r})")
        if changed:
            raise TrainingError(
                "cannot change these settings when resuming (they define the run being continued): "
                + "; ".join(changed)
            )
        base.resume = True
        base.out = cfg.out
        base.ep = cfg.ep  # a property of this launch (its process count), not of the run
        return base

    def _tokenizer(self):
        from longcat2.tokenizer import load_tokenizer

        if self.task.tokenizer_dir is None:
            raise TrainingError("no tokenizer: pass --tokenizer DIR")
        return load_tokenizer(self.task.tokenizer_dir)

    def _make_model(self) -> LongCatForCausalLM:
        cfg = self.cfg
        if self.resume_sharded:  # weights are loaded after parallelize, together with the optimizer
            return run_checkpoint.model_from_sharded(self.resume_from)
        if self.resume_from is not None:
            return run_checkpoint.load_model(self.resume_from)
        if hasattr(self.task, "vocab_size") and self.task.tokenizer_dir is None:  # synthetic tasks
            if cfg.init:
                return self._init_with_overrides(
                    run_checkpoint.load_model(run_checkpoint.resolve_init(cfg.init))
                )
            ids = dict(vocab_size=self.task.vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
            overrides = {**cfg.model_overrides, **ids, "torch_dtype": "float32"}
            try:
                return LongCatForCausalLM(ModelConfig.from_preset(cfg.preset, **overrides))
            except (ValueError, TypeError) as e:
                raise TrainingError(f"model config: {e}") from e
        tok = self._tokenizer()
        if cfg.init:
            path = run_checkpoint.resolve_init(cfg.init)
            self._log(f"init: weights from {path}")
            model = self._init_with_overrides(run_checkpoint.load_model(path))
            if model.config.vocab_size < tok.vocab_size:
                raise TrainingError(
                    f"init: the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                    f"{tok.vocab_size} ({self.task.tokenizer_dir})"
                )
            return model
        overrides = dict(cfg.model_overrides)
        overrides.update(
            vocab_size=tok.vocab_size,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            torch_dtype="float32",
        )
        try:
            mcfg = ModelConfig.from_preset(cfg.preset, **overrides)
        except (ValueError, TypeError) as e:
            raise TrainingError(f"model config: {e}") from e
        return LongCatForCausalLM(mcfg)

    def _init_with_overrides(self, model: LongCatForCausalLM) -> LongCatForCausalLM:
        """Apply `--model KEY=VALUE` to an --init model: fields that leave every weight shape alone (LSA
        budget, RoPE scaling, fusion rule, ...) are taken; a field that would change a shape is an error."""
        overrides = dict(self.cfg.model_overrides)
        if not overrides:
            return model
        try:
            new_cfg = model.config.replace(**overrides).validate()
        except (ValueError, TypeError) as e:
            raise TrainingError(f"model config: {e}") from e
        with torch.random.fork_rng(devices=[]):
            rebuilt = LongCatForCausalLM(new_cfg)
        old, new = model.state_dict(), rebuilt.state_dict()
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new or old[key].shape != new[key].shape:
                shapes = (
                    tuple(old[key].shape) if key in old else None,
                    tuple(new[key].shape) if key in new else None,
                )
                raise TrainingError(
                    f"--model {', '.join(overrides)}: changes the weights of the --init model at {key} "
                    f"({shapes[0]} -> {shapes[1]}); only shape-preserving fields can change on --init"
                )
        rebuilt.load_state_dict(old)
        self._log(f"init: model config overrides {overrides}")
        return rebuilt.train()

    # ------------------------------------------------------------------ state
    def _run_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides weights, optimizer and RNG (plain values: `weights_only` loads)."""
        return {
            "version": 1,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "data": self.task.state_dict(),
            "config": self.cfg.to_dict(),
            "world_size": self.world,
        }

    def trainer_state(self) -> dict[str, Any]:
        """The one-process checkpoint's trainer_state.pt."""
        return {**self._run_state(), "optimizer": self.optimizer.state_dict(), "rng": parallel.rng_state()}

    def _load_state(self, ckpt: Path) -> None:
        if self.resume_sharded:  # collective: every rank loads its shards of model and optimizer
            loaded = parallel.load_sharded(ckpt, self.model, self.optimizer)
            st = loaded.extra
            if not loaded.rng_restored:
                self._log(f"resume: RNG states are per rank; fresh seeds on {self.world} rank(s)")
        else:
            st = run_checkpoint.load_trainer_state(ckpt)
            saved_world = int(st.get("world_size", 1))
            if self.sharded:
                self._log(
                    f"resume: {ckpt} is a one-process checkpoint; its optimizer state is not sharded, so the "
                    f"optimizer moments restart on {self.world} ranks (weights, step, schedule and data "
                    "position carry over)"
                )
            else:
                self.optimizer.load_state_dict(st["optimizer"])
            if saved_world == self.world:
                parallel.set_rng_state(st["rng"])
        self.step = int(st["step"])
        self.tokens_seen = int(st["tokens_seen"])
        self.elapsed = float(st["elapsed"])
        self.nonfinite_in_row = int(st["nonfinite_in_row"])
        self.nonfinite_total = int(st["nonfinite_total"])
        self.task.load_state_dict(st["data"])
        saved = st.get("config", {})
        cfg = self.cfg
        old = (saved.get("batch_size", cfg.batch_size), saved.get("grad_accum", cfg.grad_accum))
        old_global = old[0] * old[1] * int(st.get("world_size", 1))
        new_global = cfg.batch_size * cfg.grad_accum * self.world
        if old_global != new_global:
            self._log(
                f"resume: the global batch changes from {old_global} to {new_global} sequences "
                f"({cfg.batch_size} x {cfg.grad_accum} accum x {self.world} rank(s)); keep it with "
                "--grad-accum"
            )
        self.last_saved = self.step
        self._log(f"resumed from {ckpt} at step {self.step}")

    def _tokenizer_files(self) -> list[Path]:
        d = self.task.tokenizer_dir
        return [Path(d) / n for n in run_checkpoint.TOKENIZER_FILES] if d is not None else []

    def save(self) -> Path | None:
        """Checkpoint the current step (collective when sharded); returns its directory on rank 0."""
        path = None
        if self.sharded_checkpoints:
            path = parallel.save_sharded(
                self.ckpt_root / run_checkpoint.step_dir_name(self.step),
                self.model,
                self.optimizer,
                extra={**self._run_state(), "model_config": self.model.config.to_dict()},
                mesh_info={"ep": self.dist.ep, "dp": self.dist.dp},
                files=[*self._tokenizer_files(), self.out / "train_config.json"],
            )
            if self.main:
                parallel.prune_checkpoints(run_checkpoint.list_all(self.ckpt_root), self.cfg.keep_checkpoints)
            else:
                path = None
        elif self.main:
            path = run_checkpoint.save_checkpoint(
                self.ckpt_root,
                self.step,
                self.model,
                self.trainer_state(),
                tokenizer_dir=self.task.tokenizer_dir,
                run_config=self.cfg.to_dict(),
                keep=self.cfg.keep_checkpoints,
            )
        self.last_saved = self.step
        parallel.barrier()
        return path

    def export_hf(self) -> Path | None:
        """Collective: the full model as an HF checkpoint in OUT/hf (after a run with sharded checkpoints,
        whose step directories `from_pretrained` cannot read)."""
        path = parallel.export_hf(self.model, self.out / "hf", files=self._tokenizer_files())
        if path is not None:
            self._log(f"exported the model (HF layout, from_pretrained loads it) to {path}")
        return path

    # ------------------------------------------------------------------ maths
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, LossParts, int]:
        """(weighted total loss with its graph, its parts, labelled tokens) of one micro-batch (loss.py)."""
        cfg = self.cfg
        with self._autocast():
            out = self.model(x, return_dict=True, with_mtp=cfg.mtp_weight > 0)
        ce, n = masked_ce(out.logits, y)
        total = ce
        parts = LossParts(ce=float(ce.detach()))
        if cfg.mtp_weight > 0 and out.mtp_logits:
            mtp = torch.stack(
                [masked_ce(lg, y[:, k:])[0] for k, lg in enumerate(out.mtp_logits, start=1)]
            ).mean()
            total = total + cfg.mtp_weight * mtp
            parts.mtp = float(mtp.detach())
        if cfg.first_token_loss > 0:
            first, n_first = first_token_ce(out.logits, y)
            if n_first:
                total = total + cfg.first_token_loss * first
                parts.first_token = float(first.detach())
        if cfg.z_loss > 0:
            z = balance.hidden_z_loss(out.hidden)
            total = total + cfg.z_loss * z
            parts.z = float(z.detach())
        if self.distiller is not None:
            ind = self.distiller.loss("dense" if self.step < cfg.indexer_warmup else "sparse")
            total = total + cfg.indexer_loss * ind.loss.to(total.device)
            parts.indexer_kl = float(ind.loss.detach())
            parts.indexer_recall = sum(ind.recall) / max(1, len(ind.recall))
            parts.indexer_recall_ceiling = sum(ind.recall_ceiling) / max(1, len(ind.recall_ceiling))
            parts.indexer_recall_per_layer = [float(r) for r in ind.recall]
        if cfg.balance_loss > 0 and self.moes:
            bal = balance.device_balance_loss(self.moes, cfg.balance_groups)
            total = total + cfg.balance_loss * bal
            parts.balance = float(bal.detach())
        return total, parts, n

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        batches = self.task.eval_batches(self.cfg.eval_batches)
        if self.world > 1:  # every rank must run as many forwards (collectives inside): the fewest any has
            counts = torch.zeros(self.world, dtype=torch.float64)
            counts[self.rank] = len(batches)
            batches = batches[: int(parallel.all_reduce_sum(counts).min())]
        if not batches:
            return None
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x)
            ce, n = masked_ce(logits, y)
            loss_sum += float(ce) * n
            count += n
        self.model.train()
        packed = parallel.all_reduce_sum(torch.stack([loss_sum, count]))
        val = float(packed[0] / packed[1].clamp_min(1))
        rec: dict[str, Any] = {
            "type": "eval",
            "step": self.step,
            "val_loss": val,
            "val_tokens": int(packed[1]),
        }
        bpt = self.task.bytes_per_token
        if bpt:
            rec["val_bpb"] = val / math.log(2) / bpt
        return rec

    # ------------------------------------------------------------------ loop
    def _write(self, rec: dict[str, Any]) -> None:
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.stats is not None:
            self.stats.reset()
        parts: list[LossParts] = []
        total_sum = 0.0
        tokens = 0
        for _ in range(cfg.grad_accum):
            x, y = self.task.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss, micro, _ = self.forward_loss(x, y)
            if self.stats is not None:
                self.stats.record(self.moes)
            (loss / cfg.grad_accum).backward()
            parts.append(micro)
            total_sum += float(loss.detach()) / cfg.grad_accum
            tokens += x.numel()  # processed positions (SFT: padding included)
        # sharded: FSDP has averaged the gradients over ranks (experts: all-to-all + FSDP), see parallelize.py
        gnorm = float(parallel.clip_grad_norm_(self.params, cfg.grad_clip))  # global norm; 0 = no clipping
        step_parts = LossParts.mean(parts)
        loss_t = (
            parallel.all_reduce_sum(torch.tensor([step_parts.ce, total_sum], dtype=torch.float64))
            / self.world
        )
        ce, total = float(loss_t[0]), float(loss_t[1])
        finite = math.isfinite(total) and math.isfinite(gnorm)
        factor = self.schedule.factor(self.step)
        if finite:
            apply_schedule(self.optimizer, factor)
            self.optimizer.step()
            if self.stats is not None:
                self.stats.all_reduce(parallel.all_reduce_sum)  # global expert counts
                rate_scale = factor if cfg.bias_update_decay == "lr" else 1.0
                if cfg.train_only == "all":  # a frozen router keeps its bias too (indexer warm-up)
                    self.controller.update(self.moes, self.stats, rate_scale)
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        global_tokens = tokens * self.world
        self.tokens_seen += global_tokens
        dt = time.perf_counter() - t0
        self.elapsed += dt
        rec: dict[str, Any] = {
            "type": "train",
            "step": self.step,
            "loss": ce,
            "total_loss": total,
            "lr": self.optimizer.param_groups[0]["base_lr"] * factor,
            "grad_norm": gnorm,
            "tokens": self.tokens_seen,
            "tokens_per_s": global_tokens / dt if dt > 0 else None,
            "step_time_s": dt,
        }
        rec.update(step_parts.metrics())
        if not finite:
            rec["skipped"] = True
            rec["nonfinite_in_row"] = self.nonfinite_in_row
        if self.stats is not None:
            rec.update(self.stats.summary())
        return rec

    def _install_signal_handlers(self) -> list[tuple[int, Any]]:
        """SIGINT/SIGTERM ask the loop to stop after the current step; a second one stops at once."""
        old = []

        def handler(signum, frame):  # noqa: ARG001
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                old.append((sig, signal.signal(sig, handler)))
        return old

    def train(self) -> int:
        """Run to `cfg.steps`; returns an exit status (0 done, 3 aborted on non-finite, 130 interrupted)."""
        cfg = self.cfg
        if self.main:
            n_params = sum(p.numel() for p in self.model.parameters())
            mc = self.model.config
            prec = "fp32" if self.amp_dtype is None else "bf16 autocast"
            layout = f" (ep {self.dist.ep} x dp {self.dist.dp}, FSDP2)" if self.sharded else ""
            self._log(
                f"{cfg.mode}: {f'init {cfg.init}' if cfg.init else f'preset {cfg.preset}'} "
                f"({n_params / 1e6:.2f} M params, vocab {mc.vocab_size}), "
                f"{self.task.describe()}\n"
                f"  {cfg.batch_size}x{cfg.seq_len} tokens x {cfg.grad_accum} accum x {self.world} rank(s)"
                f"{layout}, "
                f"{cfg.optimizer}, lr {cfg.lr}, {cfg.schedule}, {prec}, device {self.device}, "
                f"target FFN experts/token {self.controller.target}"
            )
        if self.step >= cfg.steps:
            self._log(f"nothing to do: already at step {self.step} of {cfg.steps}")
            if self.sharded_checkpoints and not (self.out / "hf" / "config.json").is_file():
                self.export_hf()
            self._finish_outputs()
            return 0
        bar = None
        if self.main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, dynamic_ncols=True, desc=cfg.mode, file=sys.stderr)
        self._stop_requested: str | None = None
        old_handlers = self._install_signal_handlers()
        status = 0
        try:
            while self.step < cfg.steps:
                rec = self._step()
                self._write(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}",
                        tok_s=f"{rec['tokens_per_s']:.0f}" if rec["tokens_per_s"] else "-",
                        ffn=rec.get("ffn_experts_per_token", "-"),
                        refresh=False,
                    )
                if self.nonfinite_in_row >= cfg.max_nonfinite:
                    self._log(
                        f"error: {self.nonfinite_in_row} steps in a row had a non-finite loss or gradient "
                        f"(limit --max-nonfinite {cfg.max_nonfinite}); stopped at step {self.step}. "
                        f"{self.nonfinite_total} step(s) skipped in total. Last good checkpoint: "
                        f"{run_checkpoint.latest_checkpoint(self.ckpt_root) or 'none'}. "
                        "Try a lower --lr, --grad-clip, or --precision fp32, or check the data."
                    )
                    status = 3
                    break
                last = self.step == cfg.steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    ev = self.evaluate()
                    if ev is not None:
                        self._write(ev)
                        if bar is not None:
                            bar.write(
                                f"step {self.step}: val loss {ev['val_loss']:.4f}"
                                + (f", {ev['val_bpb']:.4f} bits/byte" if "val_bpb" in ev else "")
                            )
                if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                    self.save()
                    if self.main and cfg.plot:
                        plot_metrics(self.metrics_path, self.out / "loss.png")
                if self.world > 1:
                    self._agree_on_stop()
                if self._stop_requested:
                    if bar is not None:
                        bar.close()
                        bar = None
                    path = self.save() if self.step > self.last_saved else None
                    self._log(
                        f"stopped by {self._stop_requested} after step {self.step}"
                        + (f"; saved {path}" if path else "")
                        + "; continue with --resume"
                    )
                    status = 130
                    break
        except KeyboardInterrupt:
            self._log(
                f"interrupted after step {self.step}; --resume continues from the last checkpoint "
                f"({run_checkpoint.latest_checkpoint(self.ckpt_root) or 'none yet'})"
            )
            status = 130
        finally:
            if bar is not None:
                bar.close()
            for sig, h in old_handlers:
                signal.signal(sig, h)
        if status == 0 and self.sharded_checkpoints:
            self.export_hf()
        self._finish_outputs()
        if status == 0 and self.main:
            recs = [r for r in read_metrics(self.metrics_path) if r.get("type") == "train"]
            if recs:
                self._log(
                    f"done: step {self.step}, loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}, "
                    f"{self.tokens_seen:,} tokens in {self.elapsed:.1f}s; checkpoint "
                    f"{run_checkpoint.latest_checkpoint(self.ckpt_root)}"
                )
        return status

    def _agree_on_stop(self) -> None:
        """A signal reaches the ranks at different moments: stop when any rank has one, all at the same step
        (the final save is collective)."""
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], dtype=torch.float64)
        if float(parallel.all_reduce_sum(flag)) > 0 and not self._stop_requested:
            self._stop_requested = "a signal on another rank"

    def _finish_outputs(self) -> None:
        if self.main and self.cfg.plot and self.metrics_path.exists():
            with contextlib.suppress(Exception):  # a plot must never fail a run
                plot_metrics(self.metrics_path, self.out / "loss.png")


def run(cfg: TrainConfig, explicit: set[str] | None = None) -> int:
    """Build a Trainer and run it; errors become a message and exit status 2."""
    try:
        trainer = Trainer(cfg, explicit)
        return trainer.train()
    except (TrainingError, ModelDirError) as e:
        rank, world, _ = parallel.env_rank_world()
        print(f"{f'[rank {rank}] ' if world > 1 else ''}error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.shutdown()
