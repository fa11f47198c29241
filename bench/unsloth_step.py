"""Real Unsloth on a CUDA box: FastLanguageModel in 4 bit with LoRA, then SDPOTrainer steps.

    python bench/unsloth_step.py RESULTS.json

Imports Unsloth first (its patched GRPOTrainer is what SDPOTrainer must build on), builds a tiny Llama in a local
folder (no model hub), loads it through `FastLanguageModel.from_pretrained(..., load_in_4bit=True)`, adds LoRA with
`get_peft_model`, and trains two SDPO steps. Records what happened, success or not, in RESULTS.json: versions, the
trainer's class chain, the teacher kind, that no state_dict key is the teacher's, the losses, whether the teacher
snapshot moved. Run by bench/gpu_check.extra.d/10-unsloth-steps.sh; never part of the CPU suite.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path


def main(out_path: str) -> None:
    record: dict = {"ran": True}
    try:
        import importlib.metadata as md

        import unsloth  # noqa: F401  (first: it patches TRL on import)
        from unsloth import FastLanguageModel

        record["versions"] = {
            d: md.version(d) for d in ("unsloth", "unsloth_zoo", "trl", "transformers", "torch", "bitsandbytes")
        }
        import torch
        from datasets import Dataset
        from transformers import LlamaConfig, LlamaForCausalLM
        from trl import GRPOConfig

        from sdpo_fast import SDPOConfig, SDPOTrainer
        from sdpo_fast.testing import tiny_tokenizer
        from sdpo_fast.unsloth import is_unsloth_patched

        tok = tiny_tokenizer()
        folder = Path(tempfile.mkdtemp()) / "tiny-llama"
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=256, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        dataset = Dataset.from_dict(
            {"prompt": [[{"role": "user", "content": f"what is {i} plus {i}?"}] for i in range(8)]}
        )

        def half(completions, **kw):
            return [{"score": float(i % 2), "feedback": None if i % 2 else "wrong"} for i in range(len(completions))]

        bf16 = torch.cuda.is_bf16_supported()
        args = GRPOConfig(
            output_dir=str(folder.parent / "run"), per_device_train_batch_size=4, num_generations=4,
            max_completion_length=8, max_steps=2, logging_steps=1, report_to=[], bf16=bf16, fp16=not bf16,
            save_strategy="no", learning_rate=1e-3,
        )  # fmt: skip
        trainer = SDPOTrainer(
            model, half, args=args, sdpo_config=SDPOConfig(distillation_topk=10, teacher_update_rate=0.5),
            train_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip
        record["trainer_mro"] = [k.__name__ for k in type(trainer).__mro__][:6]
        record["unsloth_patched"] = is_unsloth_patched(type(trainer))
        record["teacher_kind"] = trainer.teacher.kind
        record["teacher_keys_in_state_dict"] = [k for k in model.state_dict() if "teacher" in k]
        before = {n: t.clone() for n, t in trainer.teacher.snapshot.items()}
        trainer.train()
        record["losses"] = [h["sdpo/loss"] for h in trainer.state.log_history if "sdpo/loss" in h]
        record["teacher_moved"] = any(not torch.equal(t, before[n]) for n, t in trainer.teacher.snapshot.items())
        # Success means Unsloth's patched trainer ran, not merely a trainer: on CUDA (where Unsloth patches TRL)
        # an unpatched class chain is a failure, whatever the losses say.
        patched_ok = record["unsloth_patched"] or not torch.cuda.is_available()
        finite = bool(record["losses"]) and all(v == v for v in record["losses"])
        record["ok"] = bool(patched_ok and finite and record["teacher_moved"])
        if not patched_ok:
            record["error"] = f"Unsloth did not patch the trainer: its classes are {record['trainer_mro']}"
    except Exception:  # record what happened, success or not
        record["ok"] = False
        record["error"] = traceback.format_exc()
    Path(out_path).write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "error"}, indent=2))
    if not record["ok"]:
        print(record.get("error", "the SDPO steps did not train (see losses, teacher_moved)"), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1])
