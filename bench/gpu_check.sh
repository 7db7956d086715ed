#!/usr/bin/env bash
# The GPU check, in one go on a GPU host with no network (a few minutes in all):
#
#   1. installs what the host lacks from wheels in .whl/ (put there beforehand, on a machine
#      with network: bash ../shared/tools/device-wheels.sh 'msgspec>=0.18' pytest-xdist
#      'pluggy>=1.5'), into /tmp/site;
#   2. runs the whole test suite with the GPU visible (the NCCL and two-ranks-on-one-GPU
#      tests run only here; the rest must pass on a one-GPU host too), in parallel where
#      pytest-xdist is installed (-n: the cores less four, ten at most; -v, so that a run cut
#      short still names its failures), leaving out the test files whose packages the host
#      lacks (the Kubernetes validators); on an H200 host with 16 cores it took about 170 s;
#   3. brings up the demo (meshctl up: mlp, and tinygpt in a 2-stage world whose ranks share
#      the GPU), sends one mlp request and one tinygpt stream, prints each world's backend and
#      each worker's device, and stops it gracefully (every worker must exit 0);
#   4. runs a short served-vs-bare benchmark of the mlp on the GPU (bench.overhead) and
#      prints the performance section: served against bare at batch 1 (p50 above the bare
#      forward pass) and at the batcher's batch of 32 (rows/s, against a target of 0.9);
#   5. runs bench.generate with the gpt2 demo at 64 streams on the GPU: served tokens/s
#      against the same engine in one process (target 0.7) and against one stream at a time.
#
# Usage, from the repository root:  bash bench/gpu_check.sh
# Everything goes to stdout and to $OUT (or /tmp/gpu_check): tests.log, demo.log, bench.json.
# It also runs on a CPU-only host (the GPU tests skip), which is how it is checked here.
# Knobs: TESTS (default: tests, the whole suite), PYTEST_ARGS (pytest arguments instead of
# the parallel ones above),
# TESTS_TIMEOUT_S (default 480), BENCH_S (seconds per bench window, default 2).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MESH_LOG_LEVEL=${MESH_LOG_LEVEL:-WARNING}
py=${PYTHON:-python3}
status=0

echo "== host"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
    .whl/*.whl || { echo "wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
"$py" - <<'EOF'
import torch, zmq
print(f"python {__import__('sys').version.split()[0]} torch {torch.__version__} "
      f"pyzmq {zmq.__version__} cuda {torch.cuda.is_available()} "
      f"gpus {torch.cuda.device_count()}")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
EOF
device=cpu
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && device=cuda

# Every process started from here on carries this mark in its environment.
export MESH_GPU_CHECK_RUN="gpu-check-$$-$RANDOM"
sweep() {
  # A suite cut short by its timeout ends without its teardown: the controllers and workers
  # of the tests then running live on and would share the host with what is measured next.
  # Only this run's own (by the mark): never another meshserve on the same host.
  local pids=() pid
  for pid in $(pgrep -f -- '-m (controller\.cli|worker|bench\.[a-z]+)( |$)' || true); do
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null \
      | grep -qx "MESH_GPU_CHECK_RUN=$MESH_GPU_CHECK_RUN" && pids+=("$pid")
  done
  if [ "${#pids[@]}" -gt 0 ]; then
    echo "killing ${#pids[@]} processes left behind ($1)"
    kill -KILL "${pids[@]}" 2>/dev/null || true
    sleep 1
  fi
}

if [ -z "${PYTEST_ARGS+set}" ]; then
  PYTEST_ARGS=""
  if "$py" -c "import xdist" 2>/dev/null; then
    workers=$(( $(nproc) - 4 )); [ "$workers" -gt 10 ] && workers=10
    [ "$workers" -ge 2 ] && PYTEST_ARGS="-n $workers -v -p no:benchmark"
  fi
  for need in kubernetes_validate:tests/test_deploy.py lightkube:tests/test_kubernetes.py; do
    "$py" -c "import ${need%%:*}" 2>/dev/null \
      || PYTEST_ARGS="$PYTEST_ARGS --ignore=${need#*:}"
  done
fi
echo "== tests (timeout ${TESTS_TIMEOUT_S:-480}s) ${PYTEST_ARGS}"
# shellcheck disable=SC2086  # TESTS may name several paths
timeout "${TESTS_TIMEOUT_S:-480}" "$py" -m pytest -q -p no:cacheprovider -rfEs ${PYTEST_ARGS:-} \
  ${TESTS:-tests} \
  2>&1 | tee "$out/tests.log" | grep -vE '^\.+ *\[|^\[gw[0-9]+\] .* (PASSED|SKIPPED) ' || true
tail -n 1 "$out/tests.log" | grep -qE ' passed' && ! tail -n 1 "$out/tests.log" | grep -q failed \
  || { status=1; echo "tests: not all passed (with -v, the lines above name each failure)"; }
sweep "by the tests"

echo "== demo (meshctl up)"
MESH_LOG_LEVEL=INFO "$py" -m mesh.cli up >"$out/demo.log" 2>&1 &
up=$!
for _ in $(seq 120); do grep -q "meshserve ready" "$out/demo.log" && break; sleep 1; done
grep -E "meshserve (ready|: NOT)" "$out/demo.log" || { echo "demo never ready"; status=1; }
x=$("$py" -c 'print([[0.5] * 64])')
timeout 60 "$py" -m mesh.cli infer mlp "x=$x" | cut -c1-120 || status=1
timeout 60 "$py" -m mesh.cli infer tinygpt 'prompt="hello"' --stream --max-tokens 24 \
  || status=1
timeout 30 "$py" -m mesh.cli status --json | "$py" -c '
import json, sys
s = json.load(sys.stdin)
for w in s["worlds"]:
    print("world", w["id"], w["deployment"], w["state"], "backend", w["backend"],
          "workers", w["workers"])
for w in s["workers"]:
    print("worker", w["id"], w["device"], w["state"])
errors = {d["name"]: d["errors"] for d in s["deployments"] if d["errors"]}
print("errors", errors or "none")
sys.exit(1 if errors or any(d["unavailable"] for d in s["deployments"]) else 0)
' || status=1
kill -INT "$up"
wait "$up"; echo "meshctl up exited $?"
grep -E "exited with|terminate called" "$out/demo.log" | sed 's/^.*controller.launcher: //'
grep -qE "exited with -|terminate called" "$out/demo.log" && status=1
sweep "by the demo"

echo "== served vs bare (mlp on $device)"
timeout 300 "$py" -m bench.overhead --device "$device" --duration-s "${BENCH_S:-2}" \
  --rounds 2 --concurrency 1 16 --client-batch 32 --json "$out/bench.json" || status=1

echo "== performance: mlp served vs bare on $device at batch 1 and 32 (medians of rounds)"
"$py" - "$out/bench.json" <<'EOF' || status=1
import json, sys
r = json.load(open(sys.argv[1]))["mlp"]
one, full = r["c1"], r["c64"]  # batches of 32, two in flight
print(f"batch 1:  served p50 {one['served_p50_ms']:.3f} ms, bare forward "
      f"{one['bare_ms']:.3f} ms: +{one['p50_minus_bare_ms']:.3f} ms")
ratio = full["ratio_rows_per_s"]
print(f"batch 32 (64 callers): effective batch {full['effective_batch']:.1f}, served "
      f"{full['served_rps']:.0f} rows/s, bare {full['bare_rows_per_s']:.0f} rows/s at that "
      f"batch: {ratio:.2f} of bare (target >= 0.90: {'met' if ratio >= 0.9 else 'missed'})")
for c in (1, 2):
    b = r[f"b32c{c}"]
    print(f"batch 32 ({c} caller{'s' if c > 1 else ''}, 32 rows a request): served "
          f"{b['served_rps'] * 32:.0f} rows/s, bare {b['bare_rows_per_s']:.0f} rows/s: "
          f"{b['ratio_rows_per_s']:.2f} of bare")
EOF

echo "== generative serving: gpt2 demo, 64 streams, served vs in-process on $device"
timeout 400 "$py" -m bench.generate --model worker.models.gpt2:build --device "$device" \
  --streams 64 --tokens 64 --rounds 2 --window-s "${GEN_WINDOW_S:-5}" --skip-scenarios \
  --json "$out/generate.json" || status=1
"$py" - "$out/generate.json" <<'EOF' || status=1
import json, statistics, sys
r = json.load(open(sys.argv[1]))
ratio = statistics.median(r["ratios"]["new_over_floor"])
print(f"gpt2, 64 streams: served / in-process {ratio:.2f} (target >= 0.70: "
      f"{'met' if ratio >= 0.7 else 'missed'}); new / one "
      f"{statistics.median(r['ratios']['new_over_one']):.1f}x")
EOF

echo "== gpu check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
