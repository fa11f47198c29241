# cap-seconds: 30
# needs-cuda: yes
# Our head at the Qwen2.5-0.5B shape, N=16384, K=100, for several scratch budgets: small tiles may stay in L2
# between the cuBLAS GEMM that writes them and the row kernel that reads them (the cost model assumes not).
set -uo pipefail
"$PYTHON" "$REPO/bench/tile_budget.py" --out "$RESULTS_DIR/tile-budget.json"
