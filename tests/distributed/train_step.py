"""One SDPOTrainer step on two CPU processes (gloo), with one prompt group split across the ranks.

Launched by `tests/test_distributed.py` as

    python -m torch.distributed.run --nproc_per_node 2 ... tests/distributed/train_step.py MODE OUT_DIR

with MODE one of `ddp`, `fsdp2`, `fsdp2-shard-grad-op` (FSDP2 with `reshard_after_forward=False`) or
`fsdp2-asymmetric` (only rank 0 has teacher rows: feedback on rank 0, no success anywhere, one teacher
row per chunk — the ranks must still issue the same FSDP collectives).

Layout: one prompt, `num_generations=4`, `per_device_train_batch_size=2`, so rank 0 holds generations
0–1 and rank 1 holds generations 2–3 of the same group. Only rank 1's completions are rewarded, so
rank 0's samples can only get a demonstration from rank 1. Each rank writes `rank{R}.json` (what the
trainer built and computed) and `rank{R}.pt` (full parameters before and after the step); the test
asserts on them.

`fsdp2*` modes: accelerate 1.15 only switches to `DistributedType.FSDP` from a multi-*accelerator*
distributed type (MULTI_GPU, MULTI_NPU, …; see `AcceleratorState.__init__`). On a CPU-only run it
stays MULTI_CPU, never sets `fsdp_plugin` and wraps the model in DDP, without an error or warning.
`_force_fsdp_on_cpu` flips the state to FSDP right after accelerate has built it; nothing else stands
between FSDP2 and the CPU here (`fully_shard` runs on a gloo CPU mesh).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _force_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init


EMA_RATE = 0.25
# Resume a previous run's checkpoint-1 (the same mode's checkpoint): one more step from the restored teacher.
RESUME_FROM = os.environ.get("SDPO_RESUME_FROM")
MODES = (
    "ddp",
    "fsdp2",
    "fsdp2-shard-grad-op",
    "fsdp2-asymmetric",
    "ddp-lora",  # LoRA: the teacher is a snapshot of the adapter (under FSDP2: of its shards)
    "fsdp2-lora",
    "zero3",
    "zero3-init",
    "zero3-trust",  # the trust-region teacher: a frozen partitioned copy blended with the live student
    "zero3-nan",  # a non-finite loss: DeepSpeed skips the step itself, SDPO must count it and skip the EMA
)
# DeepSpeed ZeRO-3 on the CPU accelerator (gloo). `zero3-init` loads the model with `from_pretrained` under
# ZeRO-3's `zero.Init`, so the student is partitioned before SDPOTrainer builds its teacher; `zero3` hands in a
# plain model that DeepSpeed partitions when training starts.
ZERO3 = {
    "zero_optimization": {"stage": 3},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
}


def rank1_succeeds(completions, **kwargs):
    """Reward 1 for every completion generated on rank 1, 0 on rank 0 (reward functions see local samples)."""
    score = 1.0 if int(os.environ["RANK"]) == 1 else 0.0
    return [score] * len(completions)


def rank0_feedback(completions, **kwargs):
    """No success anywhere; feedback only on rank 0, so only rank 0's samples have a teacher."""
    feedback = "the answer is five" if int(os.environ["RANK"]) == 0 else None
    return [{"score": 0.0, "feedback": feedback}] * len(completions)


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter (a collective for FSDP2 DTensors and ZeRO-3: every rank calls it in the same order)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def flat(module) -> torch.Tensor:
    return torch.cat([full(p).reshape(-1).float().cpu() for p in module.parameters()])


def sharding(module) -> dict:
    params = list(module.parameters())
    return {
        "types": sorted({type(p).__name__ for p in params}),
        "placements": sorted({str(tuple(getattr(p, "placements", ()))) for p in params}),
        "mesh_sizes": sorted({p.device_mesh.size() for p in params if hasattr(p, "device_mesh")}),
        "local_numel": sum(getattr(p, "ds_tensor", getattr(p, "_local_tensor", p)).numel() for p in params),
        "full_numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params),
        "zero3_partitioned": bool(params) and all(hasattr(p, "ds_id") for p in params),
    }


def main(mode: str, out_dir: Path) -> None:
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}, got {mode!r}")
    if mode.startswith("fsdp2"):
        _force_fsdp_on_cpu()
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from sdpo_fast import SDPOConfig, SDPOTrainer
    from sdpo_fast.teacher.checkpoint import TEACHER_FILE as TEACHER_CHECKPOINT_FILE
    from sdpo_fast.testing import tiny_qwen2, tiny_tokenizer

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)  # two processes on two cores
    tok = tiny_tokenizer()
    model = tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=0)  # same seed: identical on both ranks
    prompt = [{"role": "user", "content": "what is 2 plus 3?"}]
    dataset = Dataset.from_dict({"prompt": [prompt] * 4, "answer": ["5"] * 4})
    lora = mode.endswith("-lora")
    if mode.startswith("ddp"):
        distributed = {"ddp_backend": "gloo"}
    elif mode.startswith("zero3"):
        distributed = {"deepspeed": ZERO3}
    else:
        fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}
        if mode == "fsdp2-shard-grad-op":  # FSDP2's SHARD_GRAD_OP: parameters stay gathered after forward
            fsdp_config["reshard_after_forward"] = False
        distributed = {"fsdp": True, "fsdp_config": fsdp_config}
    args = GRPOConfig(
        output_dir=str(out_dir / "run"),
        per_device_train_batch_size=2,
        num_generations=4,
        max_completion_length=8,
        generation_kwargs={"min_new_tokens": 3},  # a non-empty demonstration to look for
        max_steps=2 if RESUME_FROM else 1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        learning_rate=1e-2,
        save_strategy="steps",  # one checkpoint, after the step: it must hold the EMA teacher
        save_steps=1,
        seed=0,
        gradient_checkpointing=False,
        disable_tqdm=True,
        **distributed,
    )
    asymmetric = mode == "fsdp2-asymmetric"
    sdpo = SDPOConfig(
        distillation_topk=10,
        teacher_update_rate=EMA_RATE,
        teacher_micro_batch_size=1 if asymmetric else None,
        teacher_regularization="trust-region" if mode == "zero3-trust" else "ema",
    )
    reward = rank0_feedback if asymmetric else rank1_succeeds
    peft_refusal = None
    if mode == "zero3-init":  # under zero.Init (the GRPOConfig above switched it on): partitioned at load
        from transformers import AutoModelForCausalLM

        folder = out_dir / "model"
        if rank == 0:
            model.save_pretrained(folder)
        dist.barrier()
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert all(hasattr(p, "ds_id") for p in model.parameters()), "the model was not loaded under zero.Init"
    elif mode == "zero3":
        import peft

        probe = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        try:
            SDPOTrainer(
                copy.deepcopy(model), reward, args=args, train_dataset=dataset, processing_class=tok, peft_config=probe
            )
        except NotImplementedError as err:
            peft_refusal = str(err)
    peft_config = None
    if lora:
        import peft

        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SDPOTrainer(
        model, reward, args=args, sdpo_config=sdpo, train_dataset=dataset, processing_class=tok, peft_config=peft_config
    )

    generated, losses = [], []
    generate = trainer._generate_and_score_completions

    def capture_generation(inputs):
        output = generate(inputs)
        generated.append({k: v.detach().cpu() for k, v in output.items() if isinstance(v, torch.Tensor)})
        return output

    compute_loss = trainer.compute_loss

    def capture_loss(*a, **kw):
        loss = compute_loss(*a, **kw)
        if mode == "zero3-nan":
            loss = loss * float("nan")
        losses.append(float(loss.detach()))
        return loss

    trainer._generate_and_score_completions = capture_generation
    trainer.compute_loss = capture_loss

    def student_flat():
        module = trainer.model if trainer.is_fsdp_enabled else trainer.accelerator.unwrap_model(trainer.model)
        if lora:  # the adapter: what the optimizer trains and the teacher snapshots
            named = dict(module.named_parameters())
            return torch.cat([full(named[n]).reshape(-1).float().cpu() for n in sorted(trainer.teacher.names)])
        return flat(module)

    def teacher_flat():
        if lora:  # whole tensors (a collective under FSDP2), in name order
            state = trainer.teacher.state_dict()
            return torch.cat([state[n].reshape(-1).float() for n in sorted(state)])
        return flat(trainer.ref_model)

    student_before = student_flat()
    teacher_before = student_before.clone() if lora else teacher_flat()  # the snapshot starts as the adapter
    at_resume = {}
    if RESUME_FROM:  # the teacher as restored from the checkpoint, before the resumed step

        class Restored(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                at_resume["teacher"] = flat(trainer.ref_model)

        trainer.add_callback(Restored())
    trainer.train(resume_from_checkpoint=RESUME_FROM or None)

    student = trainer.model if trainer.is_fsdp_enabled else trainer.accelerator.unwrap_model(trainer.model)
    student_after, teacher_after = student_flat(), teacher_flat()
    if lora:
        teacher_full = {n: t.float() for n, t in trainer.teacher.state_dict().items()}
    else:
        teacher_module = getattr(trainer.ref_model, "module", trainer.ref_model)  # a DeepSpeed engine wraps it
        teacher_full = {n: full(p).float().cpu() for n, p in teacher_module.named_parameters()}
    checkpoint = None
    if trainer.args.should_save:
        last = out_dir / "run" / f"checkpoint-{trainer.state.global_step}"
        saved = torch.load(last / TEACHER_CHECKPOINT_FILE, weights_only=True)
        state = {k: v.float() for k, v in saved["state"].items()}
        checkpoint = {
            "kind": saved["kind"],
            "missing": sorted(teacher_full.keys() - state.keys()),
            "max_diff": max(float((state[n] - v).abs().max()) for n, v in teacher_full.items() if n in state),
        }
    batch = generated[0]
    t = batch["completion_ids"].shape[1]
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "student_wrapper": type(trainer.model_wrapped).__name__,
        "student_sharding": sharding(student),
        "teacher_sharding": sharding(trainer.ref_model) if trainer.ref_model is not None else None,
        "num_generation_batches": len(generated),
        "completion_ids": batch["completion_ids"].tolist(),
        "completion_texts": tok.batch_decode(batch["completion_ids"], skip_special_tokens=True),
        "teacher_input_ids": batch["teacher_input_ids"].tolist(),
        "teacher_texts": tok.batch_decode(batch["teacher_input_ids"], skip_special_tokens=True),
        "teacher_tail_is_completion": torch.equal(batch["teacher_input_ids"][:, -t:], batch["completion_ids"]),
        "self_distillation_mask": batch["self_distillation_mask"].tolist(),
        "sdpo_num_seqs": float(batch["sdpo_num_seqs"]),
        "sdpo_num_active_seqs": float(batch["sdpo_num_active_seqs"]),
        "losses": losses,
        "ema_fired_at": trainer.ema_callback.fired_at if hasattr(trainer, "ema_callback") else None,
        "skipped_steps": trainer.step_guard.skipped_at,
        "ema_rate": EMA_RATE,
        "global_step": trainer.state.global_step,
        "checkpoint_teacher": checkpoint,
        "teacher_kind": type(trainer.teacher).__name__,
        "peft_refusal": peft_refusal,
    }
    torch.save(
        {
            "student_before": student_before,
            "teacher_at_resume": at_resume.get("teacher"),
            "student_after": student_after,
            "teacher_before": teacher_before,
            "teacher_after": teacher_after,
        },
        out_dir / f"rank{rank}.pt",
    )
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    # As in fsdp_ema.py: skip interpreter teardown once the results are written and the group is gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
