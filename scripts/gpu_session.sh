#!/usr/bin/env bash
# One GPU session's work, in order of value, packing results after each part (a time-out keeps what
# finished). Run from the repo root on the GPU machine with .gpu/ carried (see docs/results.md):
#   .gpu/{acdc3s,busi30,chaos3}.npz   samatch data pack ... (commands in docs/results.md)
#   .gpu/lite_medsam_fp16.pth        LiteMedSAM weights rounded to fp16 (carry limit)
#   OUT=/some/dir bash scripts/gpu_session.sh
# PARTS picks and orders the parts (default "bench busi chaos acdc"; "bench_more" adds a step
# benchmark in channels-last with LoRA in the encoder, "bench_compile" one with schedule.compile,
# "bench_cl" bf16 in channels-last, eager then compiled, "bench_cg" compiled with CUDA graphs,
# "bench_graph" the whole step as one recorded CUDA graph, "bench_graph_compile" that compiled). The
# training parts need the packs, the bench parts only the weights and .gpu/whl (cmeel-mimalloc among
# them: the benchmarks start on it). END=<epoch seconds> stops the benchmarks in time (SIGINT: the
# benchmark saves the finished cases).
# QUICK=1 makes every part tiny (a CPU rehearsal of the script itself; numbers meaningless).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session_out}
R=runs/gpu_session
PY=${PY:-python3}
QUICK=${QUICK:-0}
MIN=${MIN:-1.0}
PARTS=${PARTS:-bench busi chaos acdc}
mkdir -p "$R" "$OUT"
export SAM_CKPT=${SAM_CKPT:-.gpu/lite_medsam_fp16.pth} PY RESULTS=$R
pack() {  # small files only (no checkpoints), as one archive: nested files do not come back
  tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='events.out.*' -C runs gpu_session 2>/dev/null
  echo "[$(date +%T)] packed after $1"
}
report() {  # SAM pseudo-label Dice (GT / predicted boxes, before / after adaptation) of a task's run
  "$PY" -m samatch.cli sam-report --run "$R/$1_samatch" --max-slices "$SLICES" --checkpoint last \
    2>&1 | grep -v Warning | tee "$R/sam_report_$1.txt"
}
if [ "$QUICK" = 1 ]; then
  BENCH=(--quick --batch 1 --steps 1 --device cpu); MIN=0.03; export ITERS=12 BATCH=2; SLICES=4
else
  BENCH=(--device cuda --batch 4,12 --steps 20 --warmup 5); SLICES=200
fi
echo "[$(date +%T)] start: $PARTS"

bounded() {  # run "$@" until END (SIGINT then), or skip it when under 20 s are left
  local left=$(( ${END:-$(( $(date +%s) + 36000 ))} - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "[$(date +%T)] skipped (${left} s left): $*"; return 1; fi
  timeout -s INT "$left" "$@"
}

step_bench() {  # step_bench NAME LINES ARGS...: bench_step.py on CUDA, JSON and log under $R, last LINES shown
  local name=$1 lines=$2
  shift 2
  bounded "$PY" benchmarks/bench_step.py "${BENCH[@]}" "$@" --sam-checkpoint "$SAM_CKPT" \
    --out "$R/$name.json" > "$R/$name.log" 2>&1
  tail -"$lines" "$R/$name.log"
}

# 1. Step benchmark: UniMatch vs joint (cached embeddings) vs reference, fp32 and bf16, a profile.
bench() { step_bench bench_step 40 --amp fp32,bf16 --profile; }
# 1b. The same in channels-last, plus SAM-Match with LoRA in the encoder (no cache).
bench_more() { step_bench bench_step_more 25 --amp bf16,fp32 --channels-last --encoder-trainable; }
# 1c. torch.compile'd U-Net and SAM decoder (the warm-up steps pay the compiles).
bench_compile() { step_bench bench_step_compile 25 --amp bf16,fp32 --compile --profile; }
# 1d. bf16 and channels-last (cuDNN's NHWC kernels), eager, then compiled.
bench_cl() {
  step_bench bench_step_cl_eager 12 --amp bf16 --channels-last --profile
  step_bench bench_step_cl_compile 12 --amp bf16 --channels-last --profile --compile
}
# 1e. The same compiled, the graphs replayed as CUDA graphs (schedule.compile_mode=reduce-overhead):
# one launch per graph instead of one per kernel, for a step bound by the host's dispatch.
bench_cg() {
  step_bench bench_step_cl_cudagraphs 12 --amp bf16 --channels-last --compile --compile-mode reduce-overhead
}
# 1f. The whole step (forward, backward, optimizers) recorded as one CUDA graph per stage and batch size
# (schedule.cuda_graph, samatch/step_graph.py), bf16 then fp32 (the reference, eager, is timed in fp32).
# The CPU rehearsal runs it eagerly: the CPU has no CUDA graphs (tests/test_step_graph.py checks the
# recording through a CPU stand-in).
bench_graph() {
  local graph=--cuda-graph
  if [ "$QUICK" = 1 ]; then graph=; fi
  step_bench bench_step_cl_graph 14 --amp bf16,fp32 --channels-last --profile $graph
}
# 1g. The same with the U-Net and SAM's decoder compiled (torch.compile's default mode: fused kernels,
# less GPU time) inside the recorded step; the warm-up steps pay the compiles (about 2 minutes).
bench_graph_compile() {
  local graph=--cuda-graph
  if [ "$QUICK" = 1 ]; then graph=; fi
  step_bench bench_step_cl_graph_compile 12 --amp bf16 --channels-last --compile $graph
}

# 2-3. SAM-Match on BUSI (30 labeled images) and CHAOS liver (3 labeled cases), each against UniMatch
# at the same iteration count, and SAM's pseudo-label report of the SAM-Match run.
busi() {
  TASK=busi PACK=${BUSI_PACK:-.gpu/busi30.npz} LABELED=30 METHODS="samatch unimatch" MATCH_ITERS=1 \
    MINUTES_SAMATCH=$MIN bash scripts/gpu_results.sh
  report busi
}
chaos() {
  TASK=chaos PACK=${CHAOS_PACK:-.gpu/chaos3.npz} LABELED=3 METHODS="samatch unimatch" MATCH_ITERS=1 \
    MINUTES_SAMATCH=$MIN bash scripts/gpu_results.sh
  report chaos
}

# 4. ACDC SAM-Match with SAM refining RV and LV only, then SAM's pseudo-label Dice before / after
# adaptation with ground-truth and predicted boxes.
acdc() {
  TASK=acdc PACK=${ACDC_PACK:-.gpu/acdc3s.npz} LABELED=3 METHODS=samatch SAM_REFINE=1,3 MINUTES_SAMATCH=$MIN \
    bash scripts/gpu_results.sh
  report acdc
}

for part in $PARTS; do
  "$part"; pack "$part"
done
echo "[$(date +%T)] done"
