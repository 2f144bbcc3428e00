#!/usr/bin/env bash
# The GPU check on a lent GPU machine, in one command (README, "On a lent GPU"):
#   bash benchmarks/gpu_check.sh OUT [python -m fastres.bench.gpu_check options]
# 1. installs the wheels carried in .whl/ (nvidia-cudnn-frontend: the machine has no network) into
#    /tmp/site and puts it on PYTHONPATH;
# 2. builds fastres._C for the visible GPU (MAX_JOBS, default 16); if the cuDNN graphs fail to
#    build it retries without them, and if the whole extension fails the check still runs (Triton
#    and torch implementations need no build); OUT/build.log keeps the compiler's output;
# 3. runs the check (by default on what is left of TOTAL_S=560 s after the build), which writes
#    OUT/gpu_check.json and OUT/gpu_check.md after every stage.
# PYTHON picks the interpreter (default python3). CI runs this with --dry-run (.ci/gpu-versions).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUT [gpu_check options]}"
shift
py="${PYTHON:-python3}"
mkdir -p "$out"
began=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "gpu_check.sh: installing .whl/ failed; building without what it held"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export MAX_JOBS="${MAX_JOBS:-16}"
if ! "$py" setup.py -q build_ext --inplace > "$out/build.log" 2>&1; then
    echo "gpu_check.sh: build failed (tail of $out/build.log below); retrying without the cuDNN graphs"
    tail -n 30 "$out/build.log"
    FASTRES_SKIP_CUDNN=1 "$py" setup.py -q build_ext --inplace >> "$out/build.log" 2>&1 \
        || echo "gpu_check.sh: fastres._C did not build; the check runs without it"
fi
echo "gpu_check.sh: build step took $(( $(date +%s) - began )) s"
# A cuDNN graph that segfaults would take the whole check with it: probe each graph op in its own
# process first (OUT/cudnn_probe.log, with cudnn-frontend's and cuDNN's API logs); on a crash, take
# the native stack of the first crashing case with cuda-gdb (OUT/cudnn_gdb.log) and run the check
# with the graphs switched off (FASTRES_CUDNN_GRAPHS=0; the check's environment records it).
if "$py" -c "import fastres, sys, torch; sys.exit(0 if fastres.build_info()['cudnn_graphs'] and torch.cuda.is_available() else 1)" 2>/dev/null; then
    CUDNN_FRONTEND_LOG_INFO=1 CUDNN_FRONTEND_LOG_FILE=stdout CUDNN_LOGLEVEL_DBG=3 CUDNN_LOGDEST_DBG=stdout \
        timeout 150 "$py" -m fastres.bench.cudnn_probe --timeout-s 40 > "$out/cudnn_probe.full.log" 2>&1
    probe=$?
    tail -c 4000000 "$out/cudnn_probe.full.log" > "$out/cudnn_probe.log"; rm -f "$out/cudnn_probe.full.log"
    grep "verdict" "$out/cudnn_probe.log"
    if [ "$probe" -ne 0 ]; then
        first=$(grep -m1 -o "verdict case [0-9]* [^:]*: crashed" "$out/cudnn_probe.log" | awk '{print $3}')
        if [ -n "$first" ] && command -v cuda-gdb > /dev/null; then
            timeout 150 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex "bt 40" -ex "info registers rip" \
                --args "$py" -m fastres.bench.cudnn_probe --case "$first" > "$out/cudnn_gdb.log" 2>&1
            grep -A40 "SIGSEGV\|signal" "$out/cudnn_gdb.log" | head -60
        fi
        echo "gpu_check.sh: the cuDNN probe failed; the check runs with FASTRES_CUDNN_GRAPHS=0"
        export FASTRES_CUDNN_GRAPHS=0
    fi
fi
spent=$(( $(date +%s) - began ))
echo "gpu_check.sh: build and probe took $spent s"
# Without an explicit --budget-s the check gets what is left of TOTAL_S (default 560 s: one device
# call of at most 600 s, with room to write the results), and at least 120 s.
budget=()
case " $* " in *" --budget-s"*) ;; *) budget=(--budget-s "$(( ${TOTAL_S:-560} - spent > 120 ? ${TOTAL_S:-560} - spent : 120 ))");; esac
PYTHONUNBUFFERED=1 "$py" -m fastres.bench.gpu_check --out "$out" "${budget[@]}" "$@"
