#!/usr/bin/env bash
# The GPU check in one command, for a bare CUDA box with torch preinstalled and no network:
#
#     bench/gpu_check.sh OUT_DIR [WHEEL_DIR ...]
#
# Runs the install step (00-install.sh), then the other steps of the steps folder (GPU_CHECK_STEPS, default
# bench/gpu_check.d) in name order, each under its "# cap-seconds: N" line, all within GPU_CHECK_TOTAL_S (480 s).
# Steps write into a work folder; OUT_DIR only ever holds four files, re-packed after every step and every
# GPU_CHECK_PACK_EVERY_S seconds during one, so that a kill at any moment still returns what was measured:
#     gpu-check.tar.gz  every log and result file     steps.tsv   each step's status and time
#     head.jsonl        the head records, judged      short-table.md   the head table, failures marked
# A lent GPU machine returns at most 8 files from its $OUT, no more than two folders down.
# Step header lines: "# cap-seconds: N"; "# on-failure: stop" (the check ends there, non-zero);
# "# needs-cuda: yes" (recorded as skipped without CUDA, e.g. in the CPU dry run). Exit status: 0 when every step
# that ran passed, 1 otherwise, 2 for bad usage. See bench/README.md ("The GPU check").
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [WHEEL_DIR ...]" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT_DIR="$(cd "$1" && pwd)"
shift
wheel_dirs=()
for d in "$@"; do
    [ -d "$d" ] || { echo "wheel folder $d does not exist (build it with bench/build_gpu_wheels.py)" >&2; exit 2; }
    wheel_dirs+=("$(cd "$d" && pwd)")
done
export REPO="$(cd "$here/.." && pwd)"
WORK="${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
mkdir -p "$WORK/results" "$WORK/site" "$WORK/shim"
export WORK RESULTS_DIR="$WORK/results" SITE_DIR="$WORK/site" SHIM_DIR="$WORK/shim"
export WHEEL_DIRS="${wheel_dirs[*]:-}"
export PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
# The project is imported from the shim (a sdpo_fast folder of links, kernels/ inside it) and the carried wheels
# from SITE_DIR, ahead of the machine's own packages; nothing is built or installed into the machine's Python.
export PYTHONPATH="$SHIM_DIR:$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
# No network there: every hub, telemetry or statistics call would wait for its timeout (Unsloth's: 120 s).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export UNSLOTH_DISABLE_STATISTICS=1 DO_NOT_TRACK=1 WANDB_DISABLED=true WANDB_MODE=disabled
total_s="${GPU_CHECK_TOTAL_S:-480}"
pack_every="${GPU_CHECK_PACK_EVERY_S:-20}"
steps_dir="${GPU_CHECK_STEPS:-$here/gpu_check.d}"
summary="$RESULTS_DIR/steps.tsv"
printf 'step\tstatus\tseconds\tcap\n' > "$summary"
start=$SECONDS
# Steps run from the work folder, never from the checkout: `python -m` puts the current folder first on
# sys.path, where the checkout's own sdpo_fast/ (without kernels/) would shadow the shim.
cd "$WORK" || exit 2

copy_out() {  # copy_out SRC NAME: replace OUT_DIR/NAME in one rename, so a kill never leaves half a file there
    cp "$1" "$OUT_DIR/.$2.part" && mv -f "$OUT_DIR/.$2.part" "$OUT_DIR/$2"
}

pack() {
    if [ -s "$RESULTS_DIR/head.jsonl" ]; then
        "$PYTHON" "$here/gpu_summary.py" "$RESULTS_DIR/head.jsonl" > "$WORK/short-table.md" 2>&1
        cp "$WORK/short-table.md" "$RESULTS_DIR/short-table.md"
        copy_out "$WORK/short-table.md" short-table.md
        copy_out "$RESULTS_DIR/head.jsonl" head.jsonl
    fi
    tar -czf "$WORK/gpu-check.tar.gz" -C "$WORK" results 2>/dev/null
    copy_out "$WORK/gpu-check.tar.gz" gpu-check.tar.gz
    copy_out "$summary" steps.tsv
}

header() { sed -n "s/^# $2: *\([A-Za-z0-9][A-Za-z0-9]*\).*/\1/p" "$1" | head -n 1; }

# The install step always runs first: the steps folder's own 00-install.sh if it has one, else the main one.
steps=("$here/gpu_check.d/00-install.sh")
[ -f "$steps_dir/00-install.sh" ] && steps=("$steps_dir/00-install.sh")
for step in "$steps_dir"/[0-9]*.sh; do
    [ "$(basename "$step")" = 00-install.sh ] || steps+=("$step")
done

failed=0
stopped=""
for step in "${steps[@]}"; do
    name="$(basename "$step" .sh)"
    cap="$(header "$step" cap-seconds)"
    cap="${cap:-60}"
    left=$(( total_s - (SECONDS - start) ))
    if [ -n "$stopped" ]; then
        printf '%s\tskipped: the check stopped after %s failed\t0\t%s\n' "$name" "$stopped" "$cap" >> "$summary"
        continue
    fi
    if (( left < 5 )); then
        printf '%s\tskipped: no time left\t0\t%s\n' "$name" "$cap" >> "$summary"
        continue
    fi
    if [ "$(header "$step" needs-cuda)" = yes ] && [ "$(cat "$WORK/cuda" 2>/dev/null)" != yes ]; then
        printf '%s\tskipped: no CUDA device\t0\t%s\n' "$name" "$cap" >> "$summary"
        continue
    fi
    (( cap > left )) && cap=$left
    export STEP_CAP_S=$cap
    echo "== $name (cap ${cap} s)"
    t0=$SECONDS
    # timeout signals the step's whole process group: workers started by a step die with it
    timeout --kill-after=10 "$cap" bash "$step" > "$RESULTS_DIR/$name.log" 2>&1 &
    pid=$!
    last_pack=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if (( SECONDS - last_pack >= pack_every )); then pack; last_pack=$SECONDS; fi
    done
    wait "$pid"
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${cap} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    (( rc == 0 )) || failed=1
    if (( rc != 0 )) && [ "$(header "$step" on-failure)" = stop ]; then
        stopped=$name
        status="$status: check stopped"
    fi
    tail -n 4 "$RESULTS_DIR/$name.log" | sed 's/^/   /'
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" "$cap" >> "$summary"
    pack
done

echo
echo "== steps (every file is in $OUT_DIR/gpu-check.tar.gz)"
column -t -s $'\t' "$summary" 2>/dev/null || cat "$summary"
if [ -s "$WORK/short-table.md" ]; then
    echo
    echo "== head, bf16, forward + backward (median; full report in the archive: results/cuda-*.md)"
    cat "$WORK/short-table.md"
fi
pack
[ -n "$stopped" ] && exit 1
exit "$failed"
