# Sourced by benchmarks/gpu_suite.sh and benchmarks/gpu_study.sh (not run on its own): put this
# checkout and, on the GPU machine, the carried wheels (benchmarks/fetch_wheels.sh) on PYTHONPATH.
# Installs only when not smoke testing and .whl/ holds wheels; the install goes to /tmp/shd_site
# (--no-deps, --no-index: the image provides everything else, nothing is fetched), as the device
# notes prescribe. Needs PY (the interpreter) and LOG (a file for pip's output) set by the caller.
# Outside smoke mode it then stops at once, with the fix, when a package the image lacks is still
# missing (e.g. .whl was not carried), rather than letting every part fail on its import.
if [ "${SMOKE:-0}" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/shd_site .whl/*.whl \
    >"$LOG" 2>&1 || { echo "wheel install failed:" >&2; cat "$LOG" >&2; exit 1; }
  export PYTHONPATH="/tmp/shd_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${SMOKE:-0}" = 0 ]; then
  missing="$("$PY" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' diffusers torch_fidelity adan_pytorch animal_mnist)"
  if [ -n "$missing" ]; then
    echo "error: not importable: $missing; run benchmarks/fetch_wheels.sh where PyPI is reachable and carry .whl" >&2
    exit 2
  fi
fi
