#!/usr/bin/env bash
# Regenerate every table of BENCHMARKS.md in one run, with the load average before and after each script.
#
#   bench/run_all.sh            # the BENCHMARKS.md settings (~50 min on the 2-vCPU box; run it on a quiet
#                               # machine: nothing else running, load average < 1 at the start)
#   bench/run_all.sh --smoke    # every script at a tiny size (minutes): checks that they all run
#   ONLY="decode decode_hi" bench/run_all.sh   # only these tables (names as in the results folder)
#
# Output: the console and bench/results/<UTC timestamp>/<table>.txt; copy the tables into BENCHMARKS.md with
# their commands, repeats, spreads and the load averages printed here.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SMOKE=0
V2_PRETRAIN=runs/default-model-v2/pretrain/checkpoints/step_00001200
HI_MODEL=${HI_MODEL:-$([[ -d $V2_PRETRAIN ]] && echo "$V2_PRETRAIN" || echo longcat2/assets/default-model)}
[[ ${1:-} == --smoke ]] && SMOKE=1
OUT=bench/results/$(date -u +%Y%m%dT%H%M%SZ)$([[ $SMOKE == 1 ]] && echo -smoke || true)
mkdir -p "$OUT"

run() {  # run <table name> <script> <args...>
    local name=$1
    shift
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
        return
    fi
    {
        echo "## $name"
        echo "\$ python $*"
        echo "# $(date -u +%FT%TZ) before: $(cut -d' ' -f1-3 /proc/loadavg) (load average 1/5/15 min), $(nproc) CPUs"
        "$PY" "$@" || echo "# FAILED with exit status $? (the other tables still run)"
        echo "# $(date -u +%FT%TZ) after: $(cut -d' ' -f1-3 /proc/loadavg) (load average 1/5/15 min)"
        echo
    } 2>&1 | tee "$OUT/$name.txt"
}

# bf16 arms only where the CPU has bf16 GEMMs (AVX512-BF16 / AMX): elsewhere PyTorch's bf16 matmul is a
# reference loop ~50x below fp32 (a transformers bf16 training step takes many minutes), and the engine and
# trainer run fp32 there anyway
BF16=$("$PY" -c 'from longcat2.devices import cpu_has_bf16_gemm; print(int(cpu_has_bf16_gemm()))')
TRAIN_PRECISION=$([[ $BF16 == 1 ]] && echo bf16 || echo fp32)
GEN_SETTINGS="tiny-flash:float32:1:64:64 small:float32:1:1024:32 small:float32:1:2048:32 small:float32:4:1024:32"
[[ $BF16 == 1 ]] && GEN_SETTINGS="$GEN_SETTINGS small:bfloat16:1:2048:32"

echo "# longcat2 benchmarks, $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(uname -n), $(nproc) CPUs"
echo "# $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
echo "# bf16 GEMM kernels on this CPU: $([[ $BF16 == 1 ]] && echo yes || echo 'no (training and generation arms in fp32)')"

if [[ $SMOKE == 1 ]]; then
    run training bench/train_throughput.py --precision fp32 --steps 1 --warmup 1 --batch-size 1 --seq-len 32 \
        --model hidden_size=128
    run decode bench/decode_lsa.py --lengths 4096 --repeats 1 --engine-lengths 4096
    run prefill bench/prefill_lsa.py --lengths 1024 --repeats 2 --tail 4096
    run generation bench/generate_vs_transformers.py --settings tiny-flash:float32:2:16:4 --repeats 2
    run ep_alltoall bench/ep_alltoall.py --steps 1 --warmup 1 --batch 1 --seq 32 --repeats 1
    run server bench/serve_load.py --levels 1,2 --max-tokens 8 --repeat 2
    run vs_vllm_cpu bench/vs_vllm_cpu.py --prompt-len 64 --new-tokens 8 --repeats 1
    run decode_ops bench/decode_ops.py --batch 2 --prompt-len 64 --steps 2 --short-kernels runs,gather
    run prefill_attn2 bench/prefill_lsa.py --preset attn-2.0 --lengths 2048 --repeats 1
    run embedded_cpu bench/embedded_cpu.py --prompt-len 2000 --new-tokens 16 --repeats 1
    run decode_hi bench/decode_lsa.py --config tiny --lengths 65536 --repeats 1 --engine-lengths "" --hi
    run prefill_1m bench/prefill_1m.py --length 32768 --decode-steps 1 --hi-block 128 --hi-min-len 4096
    run hi_quality bench/hi_quality.py --length 512 --sequences 1 --fp8
    run grammar bench/grammar_overhead.py --steps 4 --repeats 1
    run agent_session bench/agent_session.py --turns 2 --system-chars 600 --concurrent 0
else
    # "Training step: longcat2 vs transformers"
    run training bench/train_throughput.py --steps 6 --warmup 2 --precision "$TRAIN_PRECISION"
    # "Decode step of one layer": the LongCat-2.0 table and the tiny-preset line (per layer and whole model)
    run decode bench/decode_lsa.py --lengths 32768,131072,262144,1048576 --repeats 7 \
        --engine-lengths 131072,1048576 --matmul engine
    # "Prefill": every row 4K-32K and the 128K / 1M tail chunks
    run prefill bench/prefill_lsa.py --lengths 4096,8192,16384,32768 --repeats 3 --tail 131072,1048576
    # "End-to-end generation vs transformers generate": the five default settings
    # shellcheck disable=SC2086
    run generation bench/generate_vs_transformers.py --repeats 3 --settings $GEN_SETTINGS
    # "Expert-parallel all-to-all"
    run ep_alltoall bench/ep_alltoall.py --steps 8 --repeats 3
    # "Server under load": the tiny random model, then the embedded default model
    run server bench/serve_load.py --repeat 5
    run server_default_model bench/serve_load.py --model longcat2/assets/default-model --repeat 5
    # "CPU inference vs vLLM-CPU (issue 21)" (the vLLM arm needs VLLM_VENV; skipped with the reason if absent)
    run vs_vllm_cpu bench/vs_vllm_cpu.py --repeats 2
    run decode_ops_b8 bench/decode_ops.py --dtype float32 --batch 8 --steps 16 --short-kernels runs,gather
    run decode_ops_b1 bench/decode_ops.py --dtype float32 --batch 1 --steps 16
    run prefill_attn2 bench/prefill_lsa.py --preset attn-2.0 --lengths 4096,16384 --repeats 1
    run prefill_attn2_plain bench/prefill_lsa.py --preset attn-2.0 --lengths 4096 --repeats 1 --arms dense \
        --kernel plain
    run decode_attn2 bench/decode_lsa.py --config tiny --lengths 4096 --repeats 3 --engine-preset attn-2.0 \
        --engine-lengths 8192,32768 --cpu-time
    run embedded_cpu bench/embedded_cpu.py --repeats 2
    # "Hierarchical indexing and FP8 index keys": decode at 1M, the full 1M prefill, selection quality
    run decode_hi bench/decode_lsa.py --config longcat-2.0 --lengths 262144,1048576 --repeats 5 \
        --engine-lengths "" --hi --matmul engine
    run prefill_1m bench/prefill_1m.py --hi-block 128
    # selection quality on a trained indexer: HI_MODEL (default: the v2 build's final pretraining checkpoint
    # when scripts/build_default_model.sh has run here, else the embedded model)
    run hi_quality bench/hi_quality.py --model "$HI_MODEL" --lengths 2048,4096 --keep 0.5 --fp8
    # "Grammar overhead per decode step", "Agent session with and without prefix caching"
    run grammar bench/grammar_overhead.py
    run agent_session bench/agent_session.py
    # "bf16 vs fp32 training step on this CPU" (longcat2 only)
    for p in fp32 bf16; do
        run "train_$p" bench/train_throughput.py --precision $p --skip-transformers --steps 2 --warmup 1 \
            --batch-size 2 --seq-len 128 --model hidden_size=256
    done
fi
echo "# results in $OUT"
