"""`TrainConfig`: every knob of `longcat2 train` / `longcat2 sft`, one dataclass (no torch import); also
`TrainingError` and the `IGNORE` label, which the tasks (`sft.py`) and the loop (`trainer.py`) share.

The CLI flags are generated from these fields (`batch_size` ↔ `--batch-size`, help text from the field's
metadata), so adding a field adds a flag. Kept free of torch so `longcat2 --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

IGNORE = -100  # label of a position without loss


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    mode: str = _f("pretrain", "pretrain | sft", cli=False)
    preset: str = _f("tiny", "model preset (see `longcat2 presets`)")
    model_overrides: dict[str, Any] = _f(None, "model config overrides KEY=VALUE", cli=False)
    init: str | None = _f(
        None,
        "start from these weights: an HF-layout dir, a checkpoint dir, a run's OUT dir (its latest checkpoint) "
        "or longcat-2.0-tiny (the embedded model)",
    )
    data: str = _f(
        "stdlib",
        "prepared data dir, a text file/folder/.jsonl, 'stdlib', synthetic tasks 'task:passkey+niah[:k=v,...]' "
        "or a folder from `longcat2 prepare --task` (sft: a chat .jsonl)",
    )
    val_data: str | None = _f(None, "sft: validation chat .jsonl (default: hold out a share of --data)")
    group_by_length: bool = _f(
        False,
        "sft: batches of conversations of similar length (less padding; transformers' group_by_length): "
        "each shuffled window of 64 batches is sorted by length, then the batches are shuffled",
    )
    data_cache: str | None = _f(
        None, "where raw --data is tokenized to (default: ~/.cache/longcat2/data/...)"
    )
    data_max_bytes: int | None = _f(8_000_000, "read at most this many bytes of raw --data (0 = all)")
    tokenizer: str | None = _f(None, "tokenizer dir (default: the data's or the --init checkpoint's)")
    vocab_size: int = _f(4096, "vocabulary of the tokenizer trained for raw --data")
    out: str = _f("runs/train", "output directory")
    # batch and schedule
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(8, "sequences per micro-batch (per rank)")
    seq_len: int = _f(128, "tokens per sequence")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    optimizer: str = _f("muon", "muon (Muon for hidden matrices + AdamW) | adamw", choices=("muon", "adamw"))
    lr: float = _f(3e-3, "peak learning rate (AdamW groups; Muon too unless --muon-lr)")
    muon_lr: float | None = _f(None, "peak learning rate of the Muon groups")
    weight_decay: float = _f(0.1, "decoupled weight decay (not on embeddings, norms)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    momentum: float = _f(0.95, "Muon momentum")
    ns_steps: int = _f(5, "Muon Newton-Schulz iterations")
    schedule: str = _f("cosine", "cosine | wsd | constant", choices=("cosine", "wsd", "constant"))
    warmup: int = _f(20, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "final LR as a fraction of the peak")
    decay_frac: float = _f(0.2, "wsd: fraction of the steps spent decaying")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    # model and losses
    precision: str = _f(
        "auto", "auto (bf16 autocast where supported) | bf16 | fp32", choices=("auto", "bf16", "fp32")
    )
    grad_checkpointing: bool = _f(False, "recompute decoder layers in backward (activation checkpointing)")
    mtp_weight: float = _f(0.1, "weight of the MTP loss (0 = no MTP forward)")
    z_loss: float = _f(1e-6, "hidden z-loss coefficient")
    first_token_loss: float = _f(
        0.0,
        "sft: weight of an extra CE on the first token of every assistant reply, where it decides between a "
        "tool call, a refusal and an answer (0 = off)",
    )
    balance_loss: float = _f(0.0, "device-level balance loss coefficient")
    balance_groups: int = _f(4, "expert-parallel groups for the balance loss")
    indexer_loss: float = _f(0.0, "weight of the LSA indexer KL distillation loss (0 = off; train/sparse.py)")
    indexer_warmup: int = _f(0, "steps of dense-row indexer KL before the selected-set (sparse) KL")
    indexer_cross_layer: bool = _f(
        True, "distil a cross-layer owner toward the mean of the attention of every sublayer it serves"
    )
    attention: str = _f(
        "sparse",
        "sparse (LSA top-k once the context exceeds index_topk) | dense (never select)",
        choices=("sparse", "dense"),
    )
    train_only: str = _f(
        "all", "all | indexer (freeze everything else: the LSA dense warm-up)", choices=("all", "indexer")
    )
    target_ffn_experts: float | None = _f(None, "target FFN experts per token K_e (default 2/3 of moe_topk)")
    bias_update_rate: float = _f(0.5, "step size mu of the expert-bias update (0 = off)")
    bias_update_decay: str = _f("none", "none | lr: scale mu with the LR schedule", choices=("none", "lr"))
    # run control
    seed: int = _f(0, "seed of model init and data order")
    deterministic: bool = _f(False, "deterministic algorithms (bit-exact resume on CPU)")
    device: str = _f("auto", "auto (the current accelerator, else cpu) | cpu | cuda | cuda:N | <type>[:N]")
    ep: int = _f(
        1,
        "expert-parallel degree under torchrun: routed experts split over groups of EP ranks, FSDP2 for the "
        "rest (must divide the process count and n_routed_experts; per launch, not taken from a checkpoint)",
    )
    threads: int | None = _f(
        None, "torch CPU threads (default: torch's; bit-exact resume needs the same count)"
    )
    save_every: int = _f(100, "checkpoint every N steps (and at the end; 0 = only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints to keep (0 = all)")
    eval_every: int = _f(100, "evaluate every N steps (and at the end; 0 = only at the end)")
    eval_batches: int = _f(8, "validation batches per evaluation")
    max_nonfinite: int = _f(5, "abort after this many non-finite steps in a row")
    progress: bool = _f(True, "show a progress bar")
    plot: bool = _f(True, "write OUT/loss.png")
    resume: bool = _f(False, "continue from the latest checkpoint in OUT")

    def __post_init__(self) -> None:
        if self.model_overrides is None:
            self.model_overrides = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields a resumed run may change; everything else comes from the checkpoint. The batch layout
# (batch_size per rank, grad_accum) may change with the process count, so that a run resumed on another
# world size can keep its global batch (batch_size x grad_accum x ranks; the trainer says when it changes).
RESUME_MUTABLE = {
    "steps", "save_every", "keep_checkpoints", "eval_every", "eval_batches", "max_nonfinite", "progress",
    "plot", "threads", "resume", "out", "device", "ep", "batch_size", "grad_accum",
}  # fmt: skip
