"""SDPO with Unsloth: a 4-bit (QLoRA) or 16-bit LoRA model on one small GPU, e.g. a free Colab T4.

    pip install unsloth "sdpo-fast"                      # on a CUDA machine
    python examples/sdpo_with_unsloth.py                 # Qwen2.5-1.5B-Instruct in 4 bit, arithmetic
    python examples/sdpo_with_unsloth.py --dataset gsm8k --max-steps 200
    python examples/sdpo_with_unsloth.py --smoke         # CPU, no Unsloth: PEFT LoRA on the tiny model

Import order matters: Unsloth patches TRL's `GRPOTrainer` when it is imported, so `import unsloth` comes
before `trl`, `transformers` and `sdpo_fast` (first line of the script or notebook). `SDPOTrainer` builds
itself on whatever `trl.GRPOTrainer` is at construction time, so a late import still works, with a warning.

With a LoRA model the SDPO teacher is a snapshot of the adapter (an EMA of the trained adapter), swapped
into the one adapter for teacher forwards, so SDPO needs no second copy of the model and no second adapter. On a T4 (no bfloat16) training runs in fp16.
"""

from __future__ import annotations

import sys

# Unsloth first. `--smoke` runs without it (CPU), so it is not even imported there.
UNSLOTH_ERROR: Exception | str | None = None
FastLanguageModel = None
if "--smoke" in sys.argv:
    UNSLOTH_ERROR = "--smoke"
else:
    try:
        import unsloth  # noqa: F401  (must precede trl / transformers / sdpo_fast)
        from unsloth import FastLanguageModel
    except Exception as err:  # not installed, or no supported GPU
        UNSLOTH_ERROR = err

import random  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from _common import (  # noqa: E402
    finish_args,
    grpo_args,
    make_parser,
    print_summary,
    quarter_means,
    tiny_model,
    train_with_progress,
    user_turn,
)
from basic_sdpo import FEEDBACK_WORDS, arithmetic_rows, exact_match_with_feedback, gsm8k_rows  # noqa: E402

DEFAULT_MODEL = "unsloth/Qwen2.5-1.5B-Instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_with_unsloth(args):
    """The model in 4 bit (or 16 bit) with LoRA adapters, through Unsloth."""
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model,
        max_seq_length=args.max_seq_length,
        load_in_4bit=not args.no_4bit,
        dtype=None,  # float16 on a T4 (sm_75), bfloat16 on Ampere and newer
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        target_modules=LORA_TARGETS,
        use_gradient_checkpointing="unsloth",  # offloaded activations: the biggest memory saver on 16 GB
        random_state=args.seed,
    )
    tokenizer.padding_side = "left"
    return model, tokenizer


def main() -> None:
    parser = make_parser(__doc__, steps=60, smoke_steps=2)
    parser.set_defaults(model=DEFAULT_MODEL)
    parser.add_argument("--dataset", choices=["arithmetic", "gsm8k"], default="arithmetic")
    parser.add_argument("--no-4bit", action="store_true", help="16-bit LoRA instead of 4-bit QLoRA.")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    args = parser.parse_args()
    if args.smoke:
        args.model = None  # the tiny built-in model
    args = finish_args(args, "sdpo_with_unsloth")

    from datasets import Dataset
    from peft import LoraConfig

    from sdpo_fast import SDPOConfig, SDPOTrainer
    from sdpo_fast.unsloth import is_unsloth_patched

    facts: dict[str, Any] = {}
    peft_config = None
    if args.smoke:
        print("--smoke: running on the CPU without Unsloth, with PEFT LoRA on the tiny built-in model instead.")
        model, tokenizer = tiny_model(FEEDBACK_WORDS, seed=args.seed)
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0)
        facts.update(model="tiny-qwen2 (built in code)", backend="PEFT LoRA (Unsloth not used)")
        max_completion_length, batch, lr = 4, 16, 1e-3
    else:
        if FastLanguageModel is None:
            raise SystemExit(
                f"Unsloth is not available ({UNSLOTH_ERROR!r}). Install it on a CUDA machine "
                "(`pip install unsloth`), or run `python examples/sdpo_with_unsloth.py --smoke` for the CPU path."
            )
        model, tokenizer = load_with_unsloth(args)
        facts.update(model=args.model, backend=f"Unsloth {'4-bit QLoRA' if not args.no_4bit else '16-bit LoRA'}")
        max_completion_length = 256 if args.dataset == "gsm8k" else 64
        batch, lr = 8, args.learning_rate

    rows = gsm8k_rows() if args.dataset == "gsm8k" else None
    rows = rows or arithmetic_rows()
    rng = random.Random(args.seed)
    picked = [rng.choice(rows) for _ in range(args.max_steps * batch)]
    dataset = Dataset.from_dict(
        {"prompt": [user_turn(r["question"]) for r in picked], "answer": [r["answer"] for r in picked]}
    )
    cuda = torch.cuda.is_available()
    trainer = SDPOTrainer(
        model,
        reward_funcs=exact_match_with_feedback,
        args=grpo_args(
            args.output_dir,
            seed=args.seed,
            max_steps=args.max_steps,
            learning_rate=lr,
            per_device_train_batch_size=batch,
            num_generations=8,
            max_completion_length=max_completion_length,
            optim="adamw_8bit" if cuda else "adamw_torch",  # bitsandbytes ships with Unsloth
        ),
        sdpo_config=SDPOConfig(
            distillation_topk=100,  # K: memory of the head grows with it; 20–100 is plenty
            teacher_micro_batch_size=4 if cuda else None,  # teacher forward in slices: lower peak memory
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    curve, _, seconds = train_with_progress(trainer)
    print_summary(
        "sdpo_with_unsloth summary",
        {
            **facts,
            "trainer_on_unsloth_patched_grpo": is_unsloth_patched(type(trainer)),
            "teacher": trainer.teacher.kind,
            "steps": trainer.state.global_step,
            "train_seconds": round(seconds, 1),
            "reward_first_quarter": quarter_means(curve)[0],
            "reward_last_quarter": quarter_means(curve)[1],
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else "n/a (CPU)",
        },
        args.output_dir,
    )


if __name__ == "__main__":
    main()
