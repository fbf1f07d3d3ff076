# Sourced by benchmarks/gpu_suite.sh and benchmarks/gpu_study.sh (not run on its own): put this
# checkout and, on the GPU machine, the carried wheels (benchmarks/fetch_wheels.sh) on PYTHONPATH.
# Installs only when not smoke testing and .whl/ holds wheels; the install goes to /tmp/shd_site
# (--no-deps, --no-index: the image provides everything else, nothing is fetched), as the device
# notes prescribe. Needs PY (the interpreter) and LOG (a file for pip's output) set by the caller.
if [ "${SMOKE:-0}" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/shd_site .whl/*.whl \
    >"$LOG" 2>&1 || { echo "wheel install failed:" >&2; cat "$LOG" >&2; exit 1; }
  export PYTHONPATH="/tmp/shd_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
