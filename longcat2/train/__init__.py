"""Training: `longcat2 train` (pre-training) and `longcat2 sft` (chat fine-tuning).

Modules: `trainer` (the loop), `task` (the Task protocol, pre-training token shards, the choice of task),
`sft` (chat data task), `synthetic` (long-context task data), `loss` (masked CE, typed loss parts),
`env` (precision, determinism, CPU heap), `metrics` (metrics.jsonl, loss.png), `config` (`TrainConfig`),
`optim` (Muon + AdamW, schedules), `balance` (expert-bias budget control, balance loss, z-loss, routing
stats), `run_checkpoint` (a run's atomic step_* checkpoints: HF-layout model + trainer state), `sparse`
(LSA indexer distillation), `cli` (the commands' flags, generated from `TrainConfig`). Multi-process runs
use `longcat2.parallel` (torchrun, FSDP2 + EP).
"""
