# cap-seconds: 240
# The head sweep: bf16 forward + backward, ours (Triton) against TRL chunked, Liger's fused JSD, naive and our
# logsumexp floor, K ∈ {100, 20}. Shapes in priority order (the goal shapes first: Llama-3.1-8B, where the ≥ 50%
# of peak goal is set, and Qwen2.5-0.5B at 16k), N = 16384 first; one worker process per shape, each under its own
# timeout, and run.py stops starting workers when its time budget is spent, so the report and the correctness
# verdicts are always written. Each record is judged before it is appended to head.jsonl. SWEEP_SHAPES,
# SWEEP_TOKENS, SWEEP_IMPLS, SWEEP_RUNS, SWEEP_WARMUP and SWEEP_WORKER_TIMEOUT_S override the defaults.
set -uo pipefail
budget=$(( ${STEP_CAP_S:-240} - 20 ))  # 20 s for the report after the last worker
"$PYTHON" "$REPO/bench/run.py" --bench head \
    --model-shape "${SWEEP_SHAPES:-llama-3.1-8b,qwen2.5-0.5b,llama-3.2-1b,qwen2.5-7b}" \
    --tokens "${SWEEP_TOKENS:-16384,4096,1024}" --topk 100,20 \
    --impl "${SWEEP_IMPLS:-sdpo_fast-triton,lse-triton,trl-chunked,liger-jsd,naive}" \
    --runs "${SWEEP_RUNS:-3}" --warmup "${SWEEP_WARMUP:-1}" \
    --time-budget "$budget" --worker-timeout "${SWEEP_WORKER_TIMEOUT_S:-100}" \
    --out-dir "$RESULTS_DIR" --no-plot --json "$RESULTS_DIR/head.json" --jsonl "$RESULTS_DIR/head.jsonl"
