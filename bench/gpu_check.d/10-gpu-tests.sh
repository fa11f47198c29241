# cap-seconds: 150
# tests/test_gpu.py: the Triton head against the float64 oracle at model scale, the exact tails at V=151936,
# the candidate-overflow fallback, the memory bound at 16k tokens and a training step through backend="auto".
set -uo pipefail
cd "$REPO"
"$PYTHON" -m pytest tests/test_gpu.py -q -ra --junitxml="$RESULTS_DIR/gpu-tests.xml"
