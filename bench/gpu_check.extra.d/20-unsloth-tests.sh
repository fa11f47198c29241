# cap-seconds: 150
# needs-cuda: yes
# The Unsloth tests that skip without a GPU: both import orders and the patched trainer. Names and durations in
# the log as they finish; pytest-timeout stops a hung test after 90 s.
set -uo pipefail
timeout_flag=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=90)
"$PYTHON" -m pytest "$REPO/tests/test_unsloth.py" --rootdir "$REPO" -c "$REPO/pyproject.toml" -v -rA \
    --durations=0 -o faulthandler_timeout=60 "${timeout_flag[@]}" -k "import_order or unsloth_optimization" \
    --junitxml="$RESULTS_DIR/unsloth-tests.xml"
