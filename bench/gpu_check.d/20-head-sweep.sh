# cap-seconds: 240
# The issue-11 head sweep: N ∈ {16384, 4096, 1024} × K ∈ {100, 20} × four lm_head shapes, against TRL chunked,
# Liger's fused JSD, naive and our logsumexp floor, bf16, forward + backward, one process per (shape, N). Records
# are appended to head.jsonl as they are measured (a cut-short run keeps them); run.py writes the full report
# (cuda-<gpu>-<date>-head-partial.json/.md) at the end. Override SWEEP_SHAPES / SWEEP_TOKENS / SWEEP_RUNS /
# SWEEP_WARMUP to shrink it.
set -uo pipefail
cd "$REPO"
"$PYTHON" bench/run.py --bench head \
    --model-shape "${SWEEP_SHAPES:-qwen2.5-0.5b,llama-3.2-1b,qwen2.5-7b,llama-3.1-8b}" \
    --tokens "${SWEEP_TOKENS:-16384,4096,1024}" --topk 100,20 \
    --impl naive,trl-chunked,liger-jsd,lse-triton,sdpo_fast-triton \
    --runs "${SWEEP_RUNS:-3}" --warmup "${SWEEP_WARMUP:-1}" \
    --out-dir "$RESULTS_DIR" --no-plot --json "$RESULTS_DIR/head.json" --jsonl "$RESULTS_DIR/head.jsonl"
