#!/usr/bin/env bash
# Every GPU figure the README's targets need, from one command on one GPU (sized for an H200 lent
# for ~10 minutes). Run from the repository root:
#
#   bash benchmarks/fetch_wheels.sh                  # once, where PyPI is reachable -> .whl/ (~9 MiB)
#   bash benchmarks/gpu_suite.sh                     # on the GPU machine (run tool: carry [".whl"])
#   bash benchmarks/gpu_suite.sh --smoke             # every part at toy size on the CPU (tests/test_gpu_suite.py)
#
# Writes $OUT/gpu_suite.json and $OUT/gpu_suite.md (device, versions, command, every figure and the
# target ratios) plus the raw per-part JSON and logs (under $OUT as raw.tar.gz, since the run tool
# returns at most 8 files; without $OUT in results/gpu/raw/, results/gpu_smoke/ with --smoke). Parts, in order of importance, each under its own
# `timeout` and all together under SUITE_BUDGET_S (default 450 s, so set-up + parts + report stay
# within 8 minutes); a part that fails or times out is recorded as such and the rest still run:
#   1. distillation step MDTv2-S/2 <- MDTv2-B/2, batch 256, bf16, none / kd / kd_shd, plus
#      kd_shd_maps (the whole-map SHD path) when bench_train_step.py offers it, and repeated with each
#      chunked --impl its --help offers;
#   2. upstream-style plain MDTv2-S/2 step, batch 256, bf16 (bench_upstream_step.py);
#   3. the SHD term alone (bench_squeeze.py): the README target setting (12 layers, 12 -> 6 heads,
#      d 64, batch 32, N = 256), then one layer pair 16 -> 6 heads at N = 256 / 1024 / 4096 (batch 8),
#      one process per N so an out-of-memory N cannot take the others down (smoke: one process,
#      raw/shd_n0.json); peak memory per row;
#   4. sampling throughput MDTv2-S/2 and DiT-XL/2 (bench_sampling.py): fast path vs the
#      upstream-style fp32 loop, batch 256 with CFG, SAMPLE_STEPS (default 10) DDPM steps timed and
#      projected linearly to 50,000 images x 250 steps;
#   5. distillation step DiT-S/2 <- DiT-XL/2 (as 1).
# Smoke mode runs the same parts at toy size on the CPU: every registry model shrunk to 4 blocks of
# head dim 8 with its head count kept (benchmarks/smoke_models.py), batch 1-2, 4-64 tokens. It
# checks the plumbing only; none of its figures means anything.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
DIT_TEACHER=DiT-XL/2
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument $arg (use --smoke or --help)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
DEST="${OUT:-results/gpu$([ $SMOKE = 1 ] && echo _smoke)}"
RAW="$DEST/raw"
mkdir -p "$RAW"
: >"$RAW/status.tsv"
START=$(date +%s)
BUDGET="${SUITE_BUDGET_S:-450}"
export PYTHONUNBUFFERED=1

LOG="$RAW/install.log"
. benchmarks/gpu_env.sh  # the carried wheels (GPU machine) and this checkout on PYTHONPATH
echo "[gpu_suite] set-up done in $(( $(date +%s) - START )) s; output $DEST"

# part NAME MAX_S CMD...: run CMD under `timeout min(MAX_S, budget left)`, log to raw/NAME.log,
# record "NAME<TAB>status<TAB>seconds" (status ok / timeout / failed rc N / skipped).
part() {
  local name="$1" max="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( max < left ? max : left ))
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped (suite budget spent)\t0\n' "$name" >>"$RAW/status.tsv"; echo "[gpu_suite] $name: skipped"; return
  fi
  local t0=$(date +%s) rc=0
  timeout --kill-after=10 "$limit" "$@" >"$RAW/$name.log" 2>&1 || rc=$?
  local dt=$(( $(date +%s) - t0 )) status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status="timeout after ${limit} s"; elif [ $rc != 0 ]; then status="failed rc $rc"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >>"$RAW/status.tsv"
  echo "[gpu_suite] $name: $status (${dt} s)"
  [ "$status" = ok ] || tail -n 5 "$RAW/$name.log" | sed "s/^/[gpu_suite]   $name: /"
}

# The SHD implementations the step / squeeze benchmarks offer (issue 9 adds a chunked one and
# reshapes bench_squeeze.py's options): read from --help so the suite runs before and after.
# Each script's --help is read once (a start-up imports torch and the package: seconds each).
HELP_STEP="$("$PY" benchmarks/bench_train_step.py --help 2>/dev/null)"
HELP_SQ="$("$PY" benchmarks/bench_squeeze.py --help 2>/dev/null)"
# choices HELP_TEXT -> the --impl choices it lists, one per line (none when it has no --impl).
choices() {
  printf '%s\n' "$1" | tr '\n' ' ' | grep -o -- '--impl {[^}]*}' | head -1 \
    | sed 's/--impl {//; s/}//' | tr ',' '\n'
}
# bench_squeeze.py before issue 9: 12 layers per run (--layers) and head_space / naive; after it:
# one layer pair per run and dense / chunked / ...; the naive N x D baseline is left out (slow).
if grep -q -- '--layers' <<<"$HELP_SQ"; then SQ_LAYERS=1; else SQ_LAYERS=0; fi
SQ_IMPLS=($(choices "$HELP_SQ" | grep -v naive))

if [ $SMOKE = 1 ]; then
  RUN=("$PY" benchmarks/smoke_models.py)  # the model benchmarks, with toy-size registry models
  STEP=(--batch 1 --input-size 4 --precision fp32 --warmup 0 --iters 1 --threads 1)
  UP=(--batch 1 --input-size 4 --precision fp32 --warmup 0 --iters 1 --threads 1 --device cpu)
  SQ=(--device cpu --warmup 0 --iters 1 --threads 1 --head-dim 8)
  SQ_TARGET=(--batch 1 --teacher-heads 4 --student-heads 2 --tokens 16)
  SQ_SWEEP=(--batch 1 --teacher-heads 4 --student-heads 2)
  if [ $SQ_LAYERS = 1 ]; then SQ+=(--dtype fp32); SQ_TARGET+=(--layers 2); SQ_SWEEP+=(--layers 1); else SQ+=(--chunk 4); fi
  TOKENS=(4 16 64)
  SMP=(--batch-size 2 --steps 2 --num-batches 1 --device cpu)
  SMP_S=(--model MDTv2-S/2 --model-arg input_size=4)
  SMP_XL=(--model DiT-XL/2 --model-arg input_size=4)
  SAMPLE_STEPS=2
else
  RUN=("$PY")
  STEP=(--batch 256 --precision bf16 --warmup 2 --iters 5)
  UP=(--batch 256 --precision bf16 --warmup 2 --iters 5)
  SQ=(--warmup 2 --iters 5 --head-dim 64)
  SQ_TARGET=(--batch 32 --teacher-heads 12 --student-heads 6 --tokens 256)
  SQ_SWEEP=(--batch 8 --teacher-heads 16 --student-heads 6)
  # Old interface: the 12 student layers in one run, bf16 teacher tensors; new: one layer pair
  # (the report multiplies by 12 for the target), the benchmark's own dtype (float32).
  if [ $SQ_LAYERS = 1 ]; then SQ+=(--dtype bf16); SQ_TARGET+=(--layers 12); SQ_SWEEP+=(--layers 1); fi
  TOKENS=(256 1024 4096)
  SAMPLE_STEPS="${SAMPLE_STEPS:-10}"
  SMP=(--batch-size 256 --steps "$SAMPLE_STEPS" --num-batches 1)
  SMP_S=(--model MDTv2-S/2)
  SMP_XL=(--model DiT-XL/2)
fi

# After issue 9, bench_train_step.py's kd_shd is the chunked q/k path and kd_shd_maps the whole-map
# (dense) path; before it kd_shd is the dense path. Both run in the same process when offered.
MODES=none,kd,kd_shd
grep -q kd_shd_maps <<<"$HELP_STEP" && MODES="$MODES,kd_shd_maps"
train_step() {  # train_step NAME STUDENT TEACHER MAX_S: every mode, then every chunked --impl offered
  local name="$1" student="$2" teacher="$3" max="$4" impl
  part "${name}_dense" "$max" "${RUN[@]}" benchmarks/bench_train_step.py --student "$student" --teacher "$teacher" \
    --modes "$MODES" "${STEP[@]}" --json "$RAW/${name}_dense.json"
  for impl in $(choices "$HELP_STEP" | grep -i chunk); do
    part "${name}_${impl}" "$max" "${RUN[@]}" benchmarks/bench_train_step.py --student "$student" --teacher "$teacher" \
      --modes kd,kd_shd --impl "$impl" "${STEP[@]}" --json "$RAW/${name}_${impl}.json"
  done
}

train_step step_mdt MDTv2-S/2 MDTv2-B/2 100
part upstream_mdt_s2 45 "${RUN[@]}" benchmarks/bench_upstream_step.py --model MDTv2-S/2 "${UP[@]}" --json "$RAW/upstream_mdt_s2.json"
part shd_target 40 "$PY" benchmarks/bench_squeeze.py "${SQ[@]}" "${SQ_TARGET[@]}" --impl "${SQ_IMPLS[@]}" --json "$RAW/shd_target.json"
if [ $SMOKE = 1 ]; then  # one process for the whole sweep: start-up dominates at toy size
  part shd_n0 30 "$PY" benchmarks/bench_squeeze.py "${SQ[@]}" "${SQ_SWEEP[@]}" --tokens "${TOKENS[@]}" \
    --impl "${SQ_IMPLS[@]}" --json "$RAW/shd_n0.json"
else
  for n in "${TOKENS[@]}"; do
    part "shd_n$n" 30 "$PY" benchmarks/bench_squeeze.py "${SQ[@]}" "${SQ_SWEEP[@]}" --tokens "$n" --impl "${SQ_IMPLS[@]}" \
      --json "$RAW/shd_n$n.json"
  done
fi
part t2i_memory 60 "$PY" benchmarks/bench_t2i_memory.py $([ $SMOKE = 1 ] && echo --tokens 32 --text-tokens 8 --method profiler) --json "$RAW/t2i_memory.json"  # issue 19: FLUX-shaped layer pair
part sampling_s2 60 "${RUN[@]}" benchmarks/bench_sampling.py "${SMP_S[@]}" "${SMP[@]}" --variants upstream,ours --out "$RAW/sampling_s2.json"
part sampling_xl2 90 "${RUN[@]}" benchmarks/bench_sampling.py "${SMP_XL[@]}" "${SMP[@]}" --variants upstream,ours --out "$RAW/sampling_xl2.json"
train_step step_dit DiT-S/2 "$DIT_TEACHER" 130

rc=0
"$PY" benchmarks/gpu_report.py --raw "$RAW" --out "$DEST" --command "bash benchmarks/gpu_suite.sh $*" \
  --sample-steps "$SAMPLE_STEPS" --dit-teacher "$DIT_TEACHER" --wall-s "$(( $(date +%s) - START ))" \
  $([ $SMOKE = 1 ] && echo --smoke) || rc=$?
if [ -n "${OUT:-}" ]; then  # the run tool returns at most 8 files from $OUT: pack the raw folder into one
  tar -czf "$DEST/raw.tar.gz" -C "$DEST" raw && rm -rf "$RAW"
fi
exit $rc  # a failed part is in the report; a failed report fails the suite
