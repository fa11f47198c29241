# cap-seconds: 240
# needs-cuda: yes
# Real Unsloth, as its own launch (GPU_CHECK_STEPS=bench/gpu_check.extra.d; install step first, as always) with
# the pruned Unsloth bundle: unsloth, unsloth_zoo, bitsandbytes (CUDA 13.0 library only), trl 1.15.0 and what they
# import that the machine lacks (bench/build_gpu_wheels.py --bundle unsloth). FastLanguageModel in 4 bit with LoRA
# on a tiny local Llama and two SDPOTrainer steps, before the tests: unsloth.json says ok only when the trainer
# Unsloth built really is Unsloth's patched one, the steps ran and the teacher moved.
set -uo pipefail
"$PYTHON" "$REPO/bench/unsloth_step.py" "$RESULTS_DIR/unsloth.json"
