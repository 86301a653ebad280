#!/usr/bin/env bash
# Rebuild the model embedded in the package (longcat2/assets/default-model/) from nothing, with the
# project's own commands: synthetic SFT data -> `longcat2 train` on the stdlib corpus -> `longcat2 sft`
# -> copy model + tokenizer into the package -> held-out evals. See docs/default-model.md.
#
#   scripts/build_default_model.sh                 # full build (the numbers in the model card)
#   PRETRAIN_STEPS=5 SFT_STEPS=5 WORK=/tmp/smoke INSTALL=0 scripts/build_default_model.sh   # smoke test
#
# Knobs (environment): WORK (run directory, default runs/default-model), PRETRAIN_STEPS, SFT_STEPS,
# SFT2_STEPS, BATCH, SEQ_LEN, SFT_SEQ_LEN, VOCAB, THREADS, SEED, INSTALL (1 = copy into the package, default 1),
# PYTHON (default .venv/bin/python). The model is a LongCat-2.0-architecture model at tiny scale: the
# `tiny` preset (LSA indexer, zero experts, N-gram embedding, MTP) with the overrides in MODEL_ARGS.
# Training runs in fp32: on this CPU, bf16 autocast (`--precision auto`) measured 8x slower per step.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/default-model}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1200}
SFT_STEPS=${SFT_STEPS:-700}
SFT2_STEPS=${SFT2_STEPS:-500}  # a second SFT pass (new cosine schedule, half the LR); 0 = none
BATCH=${BATCH:-16}
SEQ_LEN=${SEQ_LEN:-256}
SFT_SEQ_LEN=${SFT_SEQ_LEN:-768}
VOCAB=${VOCAB:-4096}
THREADS=${THREADS:-2}
SEED=${SEED:-0}
INSTALL=${INSTALL:-1}
DEST=longcat2/assets/default-model
MAX_MB=25
MODEL_ARGS=(
  --model hidden_size=128 --model num_layers=3 --model num_attention_heads=4
  --model ffn_hidden_size=256 --model expert_ffn_hidden_size=64
  --model q_lora_rank=64 --model kv_lora_rank=32
  --model oe_vocab_size_ratio=2.0 --model mtp_num_layers=1
  # the rules the shipped model was trained with (the 2.0 preset now defaults to mean / rms_norm_eps)
  --model ngram_fusion=residual --model mla_norm_eps=1e-6
)

# `longcat2 train` once the train module is registered in longcat2/cli.py, else its own entry point.
if "$PY" -m longcat2 train --help >/dev/null 2>&1; then LC=("$PY" -m longcat2); else LC=("$PY" -m longcat2.train); fi

mkdir -p "$WORK"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$WORK/build.log" >&2; }  # stderr: stdout may be a result file
run() { log "\$ $*"; "$@"; }
# stage OUT STEPS CMD...: run a training stage; skipped when OUT already has its final checkpoint, resumed
# when it has an earlier one, so an interrupted build continues where it stopped
stage() {
  local out=$1 steps=$2; shift 2
  if [ -d "$out/checkpoints/$(printf 'step_%08d' "$steps")" ]; then log "$out: done (step $steps), skipped"; return; fi
  if compgen -G "$out/checkpoints/step_*" >/dev/null; then run "$@" --out "$out" --resume; else run "$@" --out "$out"; fi
}
# seconds of training step time recorded in OUT/metrics.jsonl
step_seconds() {
  "$PY" -c 'import json,sys; print(int(sum(json.loads(l).get("step_time_s", 0) for l in open(sys.argv[1]) if l.strip())))' "$1/metrics.jsonl"
}
t_start=$(date +%s)

log "1/5 synthetic chat + tool-call SFT data"
run "$PY" scripts/make_sft_data.py --out "$WORK/sft.jsonl" --n 6000 --seed "$SEED" \
  --val-out "$WORK/sft-val.jsonl" --val-n 200

log "2/5 pretraining on the stdlib corpus"
stage "$WORK/pretrain" "$PRETRAIN_STEPS" "${LC[@]}" train --preset tiny --data stdlib --vocab-size "$VOCAB" \
  --steps "$PRETRAIN_STEPS" --batch-size "$BATCH" --seq-len "$SEQ_LEN" --lr 3e-3 --warmup 100 \
  --precision fp32 --seed "$SEED" --threads "$THREADS" --save-every 500 --eval-every 500 --no-progress \
  "${MODEL_ARGS[@]}"
t_pretrain=$(step_seconds "$WORK/pretrain")

log "3/5 supervised fine-tuning on the chat + tool-call set"
stage "$WORK/sft" "$SFT_STEPS" "${LC[@]}" sft --init "$WORK/pretrain" --data "$WORK/sft.jsonl" \
  --val-data "$WORK/sft-val.jsonl" --steps "$SFT_STEPS" --batch-size "$BATCH" --seq-len "$SFT_SEQ_LEN" \
  --lr 1e-3 --warmup 50 --precision fp32 --seed "$SEED" --threads "$THREADS" --save-every 500 \
  --eval-every 250 --no-progress
t_sft=$(step_seconds "$WORK/sft")
final=sft
if [ "$SFT2_STEPS" -gt 0 ]; then
  log "3b/5 second SFT pass at half the LR"
  stage "$WORK/sft2" "$SFT2_STEPS" "${LC[@]}" sft --init "$WORK/sft" --data "$WORK/sft.jsonl" \
    --val-data "$WORK/sft-val.jsonl" --steps "$SFT2_STEPS" --batch-size "$BATCH" --seq-len "$SFT_SEQ_LEN" \
    --lr 5e-4 --warmup 20 --precision fp32 --seed "$((SEED + 1))" --threads "$THREADS" --save-every 250 \
    --eval-every 250 --no-progress
  t_sft=$(( t_sft + $(step_seconds "$WORK/sft2") ))
  final=sft2
fi

log "4/5 collect the model + tokenizer"
latest=$(ls -d "$WORK/$final"/checkpoints/step_* | sort | tail -n 1)
stage="$WORK/default-model"
rm -rf "$stage" && mkdir -p "$stage"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json special_tokens_map.json; do
  cp "$latest/$f" "$stage/$f"
done
"$PY" - "$stage" "$latest" "$t_pretrain" "$t_sft" "$PRETRAIN_STEPS" "$SFT_STEPS" "$SEED" "$SFT2_STEPS" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path
stage, latest, t_pre, t_sft, pre_steps, sft_steps, seed, sft2_steps = sys.argv[1:]
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
info = {
    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "git_commit": commit,
    "from_checkpoint": latest,
    "pretrain_steps": int(pre_steps), "sft_steps": int(sft_steps), "sft2_steps": int(sft2_steps),
    "seed": int(seed),
    "pretrain_step_seconds": int(t_pre), "sft_step_seconds": int(t_sft),
    "recipe": "scripts/build_default_model.sh",
}
Path(stage, "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
# greedy by default: `longcat2 serve` takes the temperature of requests that set none from this file
cfg = json.loads(Path(stage, "config.json").read_text())
gen = {"do_sample": False, "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
Path(stage, "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
EOF
chmod 644 "$stage"/*
size_mb=$(du -sm "$stage" | cut -f1)
log "model directory: $size_mb MB"
if [ "$size_mb" -gt "$MAX_MB" ]; then
  echo "error: $stage is $size_mb MB, over the $MAX_MB MB budget for the package" >&2
  exit 1
fi

log "5/5 held-out evals"
run "$PY" scripts/make_sft_data.py --eval-model "$stage" --n 100 --seed 777 | tee "$WORK/eval.json"

if [ "$INSTALL" = "1" ]; then
  mkdir -p "$(dirname "$DEST")"
  rm -rf "$DEST.tmp" && cp -r "$stage" "$DEST.tmp"
  cp "$WORK/eval.json" "$DEST.tmp/eval.json"
  rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
  log "installed into $DEST"
fi
log "done in $(( $(date +%s) - t_start )) s (training step time: pretrain ${t_pretrain} s, sft ${t_sft} s)"
