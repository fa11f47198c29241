"""SDPO launched the way TRL's own scripts launch GRPO: `TrlParser`, a YAML file, command-line overrides.

    python examples/sdpo_trl_launch.py --config examples/sdpo_trl_launch.yaml
    python examples/sdpo_trl_launch.py --config examples/sdpo_trl_launch.yaml \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --max_steps 200 --teacher_update_rate 0.01
    accelerate launch examples/sdpo_trl_launch.py --config examples/sdpo_trl_launch.yaml   # several GPUs

Every field of `ScriptArguments`, `SDPOConfig`, `GRPOConfig` and `ModelConfig` is a flag and a YAML key
(the flag wins); `--distillation_topk none` distils the full vocabulary. `--model_name_or_path tiny` is a
random tiny model built in code (it only checks the plumbing), `smollm2` the offline SmolLM2-135M-Instruct.
Without `--dataset_name` the data are the built-in arithmetic questions of `basic_sdpo.py`; a dataset
from the Hub needs a `prompt` and an `answer` column. On a machine without a GPU add `--use_cpu --bf16 false`.
"""

from __future__ import annotations

import random

from _common import load_hub_model, tiny_model, user_turn
from basic_sdpo import FEEDBACK_WORDS, arithmetic_rows, exact_match_with_feedback
from datasets import Dataset, load_dataset
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from sdpo_fast import SDPOConfig, SDPOTrainer


def load_model(model_args: ModelConfig, seed: int):
    if model_args.model_name_or_path in (None, "tiny"):
        return tiny_model(FEEDBACK_WORDS, seed=seed, hidden_size=64)
    return load_hub_model(model_args.model_name_or_path, dtype=model_args.dtype or "auto")


def load_train_dataset(script_args: ScriptArguments, seed: int, size: int) -> Dataset:
    if script_args.dataset_name:
        return load_dataset(script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_train_split)
    rows, rng = arithmetic_rows(), random.Random(seed)
    picked = [rng.choice(rows) for _ in range(size)]
    return Dataset.from_dict(
        {"prompt": [user_turn(r["question"]) for r in picked], "answer": [r["answer"] for r in picked]}
    )


def main(argv: list[str] | None = None) -> SDPOTrainer:
    parser = TrlParser((ScriptArguments, SDPOConfig, GRPOConfig, ModelConfig))
    script_args, sdpo_config, training_args, model_args = parser.parse_args_and_config(argv)
    model, tokenizer = load_model(model_args, training_args.seed)
    prompts = training_args.max_steps * training_args.per_device_train_batch_size
    trainer = SDPOTrainer(
        model,
        reward_funcs=exact_match_with_feedback,
        args=training_args,
        sdpo_config=sdpo_config,
        train_dataset=load_train_dataset(script_args, training_args.seed, max(prompts, 64)),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
