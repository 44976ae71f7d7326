#!/bin/bash
# On the lent GPU host, inside .ci/gpu-host.sh: the GPU tests (TESTS_K: a pytest -k selection) and the start-ladder
# bench (issue 19), each part bounded so that one call fits its 10 minutes; logs and results go to $OUT.
# Usage: gpu-ladder.sh tests|bench
set -uo pipefail
OUT=${OUT:-/tmp/out}; B=$HOME/bench/8b
mkdir -p "$OUT" "$B"
case "$1" in
  tests)
    timeout ${TESTS_S:-330} python3 -m pytest -m gpu tests/test_gpu.py -v --durations=0 -p no:cacheprovider \
      ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu_tests.log"
    tar czf "$OUT/test-logs.tgz" $(find /tmp/pytest-of-"$(id -un)" -name "*.log" -size -20M 2>/dev/null) 2>/dev/null
    [ "${BENCH_S:-200}" = 0 ] || timeout ${BENCH_S:-200} python3 -m thaw.cli bench gpu --model-dir "$THAW_GPU_8B_MODEL" \
      --out "$B" --parts park --runs 3 2>&1 | tee "$OUT/bench-park.log" ;;
  bench)
    # one log for all parts (at most 8 files come back from a call). The parts after a stream part run with its
    # best ring setting (THAW_WEIGHTS_*: functions/weights.py); so do a later call's parts on this host, unless
    # that call sets one.
    best_stream() {
      [ -n "${THAW_WEIGHTS_READERS:-}" ] && [ "${1:-}" != again ] && return
      eval "$(python3 -c 'import json, sys
b = json.load(open(sys.argv[1])).get("stream", {}).get("best")
b and print("export THAW_WEIGHTS_READERS=%(readers)d THAW_WEIGHTS_SLOTS=%(slots)d THAW_WEIGHTS_CHUNK_MIB=%(chunk_mib)d" % b)' "$B/results.json" 2>/dev/null)"
      env | grep THAW_WEIGHTS_ | tee -a "$OUT/bench.log"
    }
    best_stream
    for part in ${PARTS:-hibernate:150 swap:170 zero:130 vllm:130 warm:290}; do
      timeout "${part#*:}" python3 -m thaw.cli bench gpu --model-dir "$THAW_GPU_8B_MODEL" --out "$B" \
        --parts "${part%%:*}" --runs ${RUNS:-2} --density-models ${DENSITY_MODELS:-8} 2>&1 | tee -a "$OUT/bench.log"
      [ "${part%%:*}" = stream ] && best_stream again
    done ;;
esac
cp "$B"/results.json "$B"/report.md "$B"/first_token.png "$B"/density.png "$B"/stream.png "$OUT"/ 2>/dev/null
grep -h "engine ready\|weights streamed\|host copy\|woken from\|hibernated\|parked\|asleep:\|died\|KV cache\|capture\|Dynamo\|Directly load\|torch.compile takes\|reconstructed serializable\|init engine\|Model loading took" \
  "$B"/work/*/up.log "$B"/work/*/state/logs/*.log 2>/dev/null | cut -c1-300 | tail -160 > "$OUT/timeline.log"
true
