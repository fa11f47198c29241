#!/usr/bin/env bash
# The GPU check in one command, for a bare CUDA box with torch preinstalled and no network:
#
#     bench/gpu_check.sh RESULTS_DIR [WHEEL_DIR]
#
# Runs the steps in bench/gpu_check.d/ in name order (NN-name.sh), each under its own time cap (its
# "# cap-seconds: N" line), all within GPU_CHECK_TOTAL_S (480 s by default), logs each step to
# RESULTS_DIR/<step>.log, and prints the steps' status and a short head table last. A step that fails or runs
# out of time does not stop the next one. To add a step, drop a script into bench/gpu_check.d/; it gets REPO,
# RESULTS_DIR, WHEEL_DIR and PYTHON in its environment. See bench/README.md ("The GPU check").
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 1 ]; then
    echo "usage: $0 RESULTS_DIR [WHEEL_DIR]" >&2
    exit 2
fi
mkdir -p "$1"
export REPO="$(cd "$here/.." && pwd)"
export RESULTS_DIR="$(cd "$1" && pwd)"
export WHEEL_DIR="${2:-${GPU_CHECK_WHEELS:-$here/wheels}}"
export PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
total_s="${GPU_CHECK_TOTAL_S:-480}"
steps_dir="${GPU_CHECK_STEPS:-$here/gpu_check.d}"
summary="$RESULTS_DIR/steps.tsv"
printf 'step\tstatus\tseconds\tcap\n' > "$summary"
start=$SECONDS

for step in "$steps_dir"/[0-9]*.sh; do
    name="$(basename "$step" .sh)"
    cap="$(sed -n 's/^# cap-seconds: *\([0-9][0-9]*\).*/\1/p' "$step" | head -n 1)"
    cap="${cap:-60}"
    left=$(( total_s - (SECONDS - start) ))
    if (( left < 5 )); then
        printf '%s\tskipped: no time left\t0\t%s\n' "$name" "$cap" >> "$summary"
        continue
    fi
    (( cap > left )) && cap=$left
    echo "== $name (cap ${cap} s)"
    t0=$SECONDS
    # timeout signals the step's whole process group: workers started by a step die with it
    timeout --kill-after=10 "$cap" bash "$step" > "$RESULTS_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${cap} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    tail -n 4 "$RESULTS_DIR/$name.log" | sed 's/^/   /'
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" "$cap" >> "$summary"
done

echo
echo "== steps (logs in $RESULTS_DIR)"
column -t -s $'\t' "$summary" 2>/dev/null || cat "$summary"
shopt -s nullglob
records=("$RESULTS_DIR"/head.jsonl)
if (( ${#records[@]} )); then
    "$PYTHON" "$here/gpu_summary.py" "${records[@]}" > "$RESULTS_DIR/short-table.md" 2>&1
    echo
    echo "== head, bf16, forward + backward (median; full report: $RESULTS_DIR/cuda-*.md)"
    cat "$RESULTS_DIR/short-table.md"
fi
