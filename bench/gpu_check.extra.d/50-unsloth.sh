# cap-seconds: 150
# Real Unsloth (issue 15), last because it installs trl 1.15.0 and transformers 5.17.0 over the box's stack
# (Unsloth 2026.10 allows no newer ones). Needs in WHEEL_DIR: unsloth, unsloth_zoo, bitsandbytes, trl==1.15.0,
# transformers==5.17.0 and what they import that the box lacks (see bench/README.md, "The GPU check"). Runs the
# three Unsloth tests that skip without a GPU (both import orders, the patched trainer), then FastLanguageModel in
# 4 bit with LoRA on a tiny local Llama folder and two SDPOTrainer steps; writes unsloth.json. Kept out of
# gpu_check.d (whose steps fill the 8 minutes): GPU_CHECK_STEPS=bench/gpu_check.extra.d bench/gpu_check.sh OUT WHEELS.
set -uo pipefail
cd "$REPO"
if [ ! -d "$WHEEL_DIR" ] || ! ls "$WHEEL_DIR"/unsloth-*.whl >/dev/null 2>&1; then
    echo "no unsloth wheel in $WHEEL_DIR: skipped (this is recorded, not hidden)"
    echo '{"ran": false, "reason": "no unsloth wheel brought along"}' > "$RESULTS_DIR/unsloth.json"
    exit 0
fi
"$PYTHON" -m pip install -q --no-index --find-links "$WHEEL_DIR" unsloth unsloth_zoo bitsandbytes "trl==1.15.0" \
    "transformers==5.17.0" || echo "pip could not install the whole Unsloth stack from $WHEEL_DIR"
"$PYTHON" -m pytest tests/test_unsloth.py -q -ra -k "import_order or unsloth_optimization"
"$PYTHON" bench/unsloth_step.py "$RESULTS_DIR/unsloth.json"
