#!/usr/bin/env bash
# One prepared session on a lent GPU machine (JAX preinstalled, no registry):
#   install graphopt without dependencies, print the card, run the GPT step table of
#   the reference GPT step (bench/gpt_step_bench.py) and, in the background at low priority, the test
#   suite on that machine's CPU under its JAX version. Logs go to $OUT (or ./gpu_out).
# Usage: DEADLINE=400 TEST_S=420 bash bench/gpu_session.sh [gpt_step_bench.py options]
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"
# The suite checks this JAX version; notebooks and graphviz drawings need packages the
# image lacks, so those two files stay out.
# SIGINT at the time limit: pytest still prints its summary of the tests that ran.
( JAX_PLATFORMS=cpu GRAPHOPT_PROGRESS=0 nice -n 19 timeout -s INT "${TEST_S:-420}" \
    $PY -m pytest -q -n "${TEST_WORKERS:-6}" -p no:cacheprovider --no-header -rfE \
    --ignore=tests/test_notebooks.py --ignore=tests/test_viz.py tests \
    > "$OUT/pytest.log" 2>&1; echo "pytest exit $?" >> "$OUT/pytest.log" ) &
PYTHONUNBUFFERED=1 GRAPHOPT_PROGRESS=0 $PY bench/gpt_step_bench.py \
  --deadline "${DEADLINE:-400}" --remat-variants "${REMAT_VARIANTS:-adaptive}" "$@" 2>&1 \
  | tee "$OUT/gpt_step.log"
wait
tail -5 "$OUT/pytest.log"
