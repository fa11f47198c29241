# cap-seconds: 150
# needs-cuda: yes
# tests/test_gpu.py: the Triton head against the float64 oracle at model scale, the exact tails at V=151936,
# the candidate-overflow fallback, the memory bound at 16k tokens and a training step through backend="auto".
# Every test's name and result goes to the log as it finishes (-v), with durations; a test that hangs is stopped
# after 90 s by pytest-timeout (in the machine's image), and faulthandler dumps its stack at 60 s either way.
set -uo pipefail
timeout_flag=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=90)
"$PYTHON" -m pytest "$REPO/tests/test_gpu.py" --rootdir "$REPO" -c "$REPO/pyproject.toml" -v -rA \
    --durations=0 -o faulthandler_timeout=60 "${timeout_flag[@]}" --junitxml="$RESULTS_DIR/gpu-tests.xml"
