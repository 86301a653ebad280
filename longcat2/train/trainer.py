"""The training loop behind `longcat2 train` (pre-training) and `longcat2 sft` (chat fine-tuning).

Design choices:
- One `Trainer` for both modes; a *task* object supplies batches, evaluation batches, its resumable data
  position and the tokenizer (`PretrainTask` here: token shards + `data.BatchSampler`; `SFTTask` in
  `sft.py`: rendered chats with an assistant-only loss mask). Labels use -100 for "no loss".
- One optimizer step = `grad_accum` micro-batches. Loss = next-token CE + `mtp_weight` · mean MTP CE
  (step k predicts token t+k+1, labels y[:, k:]) + `z_loss` · hidden z-loss + `balance_loss` · device-level
  balance loss (+ `indexer_loss` · the LSA indexer KL of `sparse.py`, dense rows for the first
  `indexer_warmup` steps, then the selected set). After the step, the expert-bias controller
  (balance.py) updates `e_score_correction_bias` from the step's routing counts.
- Precision: fp32 master weights; `auto` = bf16 autocast where the device has bf16 kernels (an
  accelerator that reports bf16 support, CPUs with AVX512-BF16/AMX: `bf16_supported`), else fp32; an explicit
  `bf16` runs wherever bf16 autocast works (on other CPUs it is emulated and slower, with a warning). On CPU
  the glibc heap is tuned so step temporaries are reused instead of page-faulted in again
  (`tune_cpu_allocator`).
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
  byte), loss.png (matplotlib, Agg), checkpoints/step_XXXXXXXX (see run_checkpoint.py), train_config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from longcat2 import parallel
from longcat2.config import ModelConfig
from longcat2.model import LongCatForCausalLM
from longcat2.model_dir import ModelDirError
from longcat2.train import balance, run_checkpoint
from longcat2.train.config import IGNORE, RESUME_MUTABLE, TrainConfig, TrainingError
from longcat2.train.optim import MuonAdamW, Schedule, apply_schedule, param_groups_for

log = logging.getLogger(__name__)


__all__ = ["RESUME_MUTABLE", "IGNORE", "PretrainTask", "TrainConfig", "Trainer", "TrainingError", "run"]


# ---------------------------------------------------------------------- tasks
class Task(Protocol):
    tokenizer_dir: Path | None
    bytes_per_token: float | None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def describe(self) -> str: ...


class PretrainTask:
    """Token shards → (x, y) windows; eval on the first `n` batches of a fixed-seed sampler over `val`."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int) -> None:
        from longcat2 import data

        self.cfg = cfg
        max_bytes = cfg.data_max_bytes or None
        try:
            shard_dir = data.ensure_prepared(
                cfg.data, cfg.data_cache, cfg.vocab_size, tokenizer=cfg.tokenizer, max_bytes=max_bytes
            )
            self.shards = data.TokenShards(shard_dir)
            self.sampler = data.BatchSampler(
                self.shards.train, cfg.batch_size, cfg.seq_len, cfg.seed, rank=rank, world_size=world
            )
        except data.DataError as e:
            raise TrainingError(f"data: {e}") from e
        tok_dir = cfg.tokenizer or self.shards.tokenizer_dir
        self.tokenizer_dir = Path(tok_dir) if tok_dir else None
        self.rank, self.world = rank, world
        val = self.shards.val
        self.val = val if len(val) >= cfg.seq_len + 1 else None
        vb = self.shards.meta["splits"]["val"].get("text_bytes") or 0
        vt = self.shards.meta["splits"]["val"].get("tokens") or 0
        self.bytes_per_token = vb / vt if vb and vt else None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.sampler)

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from longcat2 import data

        if self.val is None or n <= 0:
            return []
        s = data.BatchSampler(
            self.val, self.cfg.batch_size, self.cfg.seq_len, 1234, rank=self.rank, world_size=self.world
        )
        n = min(n, max(1, s.windows_per_epoch // (self.cfg.batch_size * self.world)))
        return [next(s) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def describe(self) -> str:
        m = self.shards.meta["splits"]
        return f"data {self.shards.dir}: {m['train']['tokens']:,} train / {m['val']['tokens']:,} val tokens"


# ---------------------------------------------------------------------- helpers
def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in glibc's heap instead of unmapping them (Linux/glibc only).

    PyTorch's CPU allocator hands every tensor to malloc; glibc serves big ones with mmap and returns them
    on free, so each training step page-faults its activations, gradients and optimizer temporaries in
    again (measured: 2.5x slower steps for a 46 M-parameter model in a VM). Raising the mmap and trim
    thresholds makes the heap reuse them. Returns whether both settings were accepted.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):
        return False


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast has fast kernels on `device`, for any device type: CPUs with AVX512-BF16/AMX
    (oneDNN), an accelerator whose torch module reports it (`torch.<type>.is_bf16_supported`), else a tiny
    bf16 matmul that must run."""
    if not torch.amp.is_autocast_available(device.type):
        return False
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    check = getattr(getattr(torch, device.type, None), "is_bf16_supported", None)
    if callable(check):
        return bool(check())
    return bf16_runs(device)


def bf16_runs(device: torch.device) -> bool:
    """Whether bf16 autocast works at all on `device` (fast or emulated): a tiny bf16 matmul must run."""
    if not torch.amp.is_autocast_available(device.type):
        return False
    try:
        x = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        return bool(torch.isfinite(x @ x).all())
    except (RuntimeError, NotImplementedError):
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. `auto` takes bf16 only where it has fast kernels; `bf16`
    takes it wherever it runs."""
    if name == "fp32":
        return None
    fast = bf16_supported(device)
    if name == "bf16" and not fast:
        if not bf16_runs(device):
            raise TrainingError(f"precision: bf16 does not run on {device}; use --precision fp32")
        log.warning("precision: %s has no native bf16 kernels; bf16 is emulated (slower than fp32)", device)
        return torch.bfloat16
    return torch.bfloat16 if fast else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl, skipping a torn last line."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records with step <= `step` (atomically)."""
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Loss curve (train loss, its EMA, validation loss) → PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("type") == "train" and r.get("loss") is not None]
    ev = [(r["step"], r["val_loss"]) for r in recs if r.get("type") == "eval"]
    tr = [(s, v) for s, v in tr if math.isfinite(v)]
    if not tr:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps, losses = zip(*tr)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="train loss")
    ema, smooth = losses[0], []
    for v in losses:
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema)
    ax.plot(steps, smooth, lw=1.5, label="train loss (EMA 0.9)")
    if ev:
        es, el = zip(*ev)
        ax.plot(es, el, "o-", lw=1.5, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png_path)
    tmp = png.with_name(".tmp-" + png.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, png)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean CE over labels != IGNORE (0 with a graph when there are none) and the count."""
    flat = labels.reshape(-1)
    n = int((flat != IGNORE).sum())
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE, reduction="sum"
    )
    return loss / max(n, 1), n


# ---------------------------------------------------------------------- trainer
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
        self._setup_determinism()
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        import random

        random.seed(cfg.seed)

        self.task = self._make_task()
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

    def _setup_determinism(self) -> None:
        cfg = self.cfg
        threads = cfg.threads
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if threads:
            torch.set_num_threads(threads)

    def _make_task(self) -> Task:
        from longcat2.train.synthetic import PreparedTask, SyntheticTask, read_task_meta

        cfg = self.cfg
        task_cls = SyntheticTask if cfg.data.startswith("task:") else None
        if task_cls is None and read_task_meta(cfg.data) is not None:
            task_cls = PreparedTask
        if task_cls is not None:
            try:
                return task_cls(cfg.data, cfg.batch_size, cfg.seq_len, cfg.seed, self.rank, self.world)
            except ValueError as e:
                raise TrainingError(str(e)) from e
        if self.cfg.mode == "sft":
            from longcat2.train.sft import SFTTask

            return SFTTask(self.cfg, self.rank, self.world)
        return PretrainTask(self.cfg, self.rank, self.world)

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

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], int]:
        cfg = self.cfg
        with self._autocast():
            out = self.model(x, return_dict=True, with_mtp=cfg.mtp_weight > 0)
        ce, n = masked_ce(out.logits, y)
        total = ce
        parts = {"ce": ce.detach()}
        if cfg.mtp_weight > 0 and out.mtp_logits:
            mtp = torch.stack(
                [masked_ce(lg, y[:, k:])[0] for k, lg in enumerate(out.mtp_logits, start=1)]
            ).mean()
            total = total + cfg.mtp_weight * mtp
            parts["mtp"] = mtp.detach()
        if cfg.z_loss > 0:
            z = balance.hidden_z_loss(out.hidden)
            total = total + cfg.z_loss * z
            parts["z"] = z.detach()
        if self.distiller is not None:
            ind = self.distiller.loss("dense" if self.step < cfg.indexer_warmup else "sparse")
            total = total + cfg.indexer_loss * ind.loss.to(total.device)
            parts["indexer_kl"] = ind.loss.detach()
            parts["indexer_recall"] = torch.tensor(sum(ind.recall) / max(1, len(ind.recall)))
            parts["indexer_recall_ceiling"] = torch.tensor(
                sum(ind.recall_ceiling) / max(1, len(ind.recall_ceiling))
            )
            for i, r in enumerate(ind.recall):
                parts[f"indexer_recall@{i}"] = torch.tensor(r)
        if cfg.balance_loss > 0 and self.moes:
            bal = balance.device_balance_loss(self.moes, cfg.balance_groups)
            total = total + cfg.balance_loss * bal
            parts["balance"] = bal.detach()
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
        sums: dict[str, float] = {}
        tokens = 0
        for _ in range(cfg.grad_accum):
            x, y = self.task.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss, parts, _ = self.forward_loss(x, y)
            if self.stats is not None:
                self.stats.record(self.moes)
            (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
            sums["total"] = sums.get("total", 0.0) + float(loss.detach()) / cfg.grad_accum
            tokens += x.numel()  # processed positions (SFT: padding included)
        # sharded: FSDP has averaged the gradients over ranks (experts: all-to-all + FSDP), see parallelize.py
        gnorm = float(parallel.clip_grad_norm_(self.params, cfg.grad_clip))  # global norm; 0 = no clipping
        loss_t = (
            parallel.all_reduce_sum(torch.tensor([sums["ce"], sums["total"]], dtype=torch.float64))
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
        for k in ("mtp", "z", "balance"):
            if k in sums:
                rec[f"{k}_loss"] = sums[k]
        for k in ("indexer_kl", "indexer_recall", "indexer_recall_ceiling"):
            if k in sums:
                rec[k] = sums[k]
        layer_keys = sorted(
            (k for k in sums if k.startswith("indexer_recall@")), key=lambda k: int(k.partition("@")[2])
        )
        per_layer = [sums[k] for k in layer_keys]
        if per_layer:  # one entry per indexer-owning attention sublayer, in model order
            rec["indexer_recall_per_layer"] = per_layer
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
