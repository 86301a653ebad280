#!/usr/bin/env bash
# Passkey accuracy through the engine (`longcat2 eval longctx --task passkey`, token-level passkey, greedy,
# chunked prefill + cached decode) with four index arms on the same examples (same --seed), side by side:
#   exact   exact LSA top-k (bf16-or-model-dtype index keys, HI off)
#   hi      hierarchical indexing forced on from the first sparse row (lsa_hi_min_len=1): pages of PAGE
#           tokens, BLOCK-token sub-block means, KEEP of the length's pages kept (sink + local pages inside)
#   fp8     fp8 index keys (e4m3 + fp32 scale per token, Hadamard-rotated), HI off
#   hi+fp8  both
# The issue-16 goals: hi within 2 points of exact, fp8 equal to exact.
#
#   nice -n 19 bench/hi_passkey.sh MODEL_DIR [LENGTHS...]          # e.g. runs/default-model-v2/long 8192 16384
#   PAGE=16 BLOCK=4 KEEP=0.25 DEPTHS=5 PER_CELL=4 ARMS="exact hi" nice -n 19 bench/hi_passkey.sh DIR 8192
#
# Knobs (environment): PAGE (16), BLOCK (4), KEEP (0.5: kept share of the length's pages), DEPTHS (3),
# PER_CELL (4), SEED (1234), ARMS ("exact hi fp8 hi+fp8"), THREADS (1), PYTHON (.venv/bin/python),
# OUT (a folder for the per-arm JSON results; default a temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
MODEL=$1
shift
LENGTHS=("${@:-8192}")
PY=${PYTHON:-.venv/bin/python}
PAGE=${PAGE:-16}
BLOCK=${BLOCK:-4}
KEEP=${KEEP:-0.5}
DEPTHS=${DEPTHS:-3}
PER_CELL=${PER_CELL:-4}
SEED=${SEED:-1234}
ARMS=${ARMS:-exact hi fp8 hi+fp8}
THREADS=${THREADS:-1}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "# $(date -u +%H:%M:%S) model $MODEL, lengths ${LENGTHS[*]}, arms $ARMS; HI pages of $PAGE, sub-blocks of" \
  "$BLOCK, $KEEP of the pages kept; $DEPTHS depths x $PER_CELL examples; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for n in "${LENGTHS[@]}"; do
  pages=$(awk -v n="$n" -v k="$KEEP" -v p="$PAGE" 'BEGIN { printf "%d", n * k / p }')  # KEEP x n / PAGE
  hi=(--override lsa_hi=true --override lsa_hi_min_len=1 --override "lsa_hi_page_size=$PAGE"
      --override "lsa_hi_block_size=$BLOCK" --override "lsa_hi_top_pages=$pages")
  for arm in $ARMS; do
    case $arm in
      exact) extra=() ;;
      hi) extra=("${hi[@]}") ;;
      fp8) extra=(--index-dtype fp8) ;;
      hi+fp8) extra=("${hi[@]}" --index-dtype fp8) ;;
      *) echo "unknown arm $arm (exact, hi, fp8, hi+fp8)" >&2; exit 2 ;;
    esac
    echo "\$ $PY -m longcat2 eval longctx --model $MODEL --task passkey --lengths $n --depths $DEPTHS" \
      "--per-cell $PER_CELL --seed $SEED --threads $THREADS --json ${extra[*]}" >&2
    "$PY" -m longcat2 eval longctx --model "$MODEL" --task passkey --lengths "$n" --depths "$DEPTHS" \
      --per-cell "$PER_CELL" --seed "$SEED" --threads "$THREADS" --json "${extra[@]}" >"$OUT/$n-$arm.json"
  done
done
"$PY" - "$OUT" "$ARMS" "${LENGTHS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, arms, lengths = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
print("length  " + "".join(f"{a:>9}" for a in arms) + "   (passkey accuracy, mean over depths)")
for n in lengths:
    row = [json.loads((out / f"{n}-{a}.json").read_text())["mean"] for a in arms]
    print(f"{n:<7} " + "".join(f"{v:9.3f}" for v in row))
EOF
echo "# $(date -u +%H:%M:%S) done; load average $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
