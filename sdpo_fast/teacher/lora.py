"""The LoRA teacher: a detached snapshot of the student's adapter, swapped into the one adapter for teacher forwards.

There is never a second adapter: `model.state_dict()` holds the student's alone, so nothing else
(vLLM weight sync, Unsloth's LoRA request builder, `save_pretrained`) can pick the teacher up, and
nothing depends on fused LoRA kernels honouring PEFT's adapter switching. A teacher forward copies
the snapshot into the adapter's tensors, runs the model, and copies the student's values back,
exactly, even when the forward raises.

The snapshot covers every trainable tensor of the PEFT model: the LoRA factors and any
`modules_to_save` copies (an adapter-trained lm_head gets its own teacher copy). It starts as an
exact copy of the student's adapter (the reference's teacher starts at the initial policy; TRL's
experimental SDPO zero-initialises its teacher adapter, i.e. starts at the base model).
"""

from __future__ import annotations

import contextlib

import torch

from ..distributed import full_weight
from ..forward import SDPORequest, eval_mode
from .base import Teacher
from .ema import _normalise_name, ema_update, local_shard


def _fit(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`tensor` (a snapshot of `param`) as `param`'s local shard, on its device; unchanged if it already is."""
    local = local_shard(param)
    if tensor.shape != local.shape and hasattr(param, "device_mesh") and tensor.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        tensor = distribute_tensor(tensor.to(local.device), param.device_mesh, param.placements).to_local()
    return tensor if tensor.device == local.device else tensor.to(local.device)


class LoraSnapshotTeacher(Teacher):
    """The adapter's trainable tensors, by name, bound to the live model on every use.

    FSDP2 replaces every parameter with a DTensor when accelerate prepares the model, and DeepSpeed moves them
    to the GPU: both happen after the trainer is built. So the parameters are looked up by name each time, and
    the snapshot is taken on first use (always before the first optimizer step), from the parameters as they
    are then: the local shards, on their device.
    """

    kind = "lora-snapshot"

    def __init__(self, peft_model, accelerator, lockstep: bool = False):
        self.peft_model = peft_model
        self.accelerator = accelerator
        self.lockstep = lockstep  # under FSDP2 every forward through the model is a collective
        self.names = {_normalise_name(name) for name, p in peft_model.named_parameters() if p.requires_grad}
        if not self.names:
            raise ValueError(
                "The PEFT model has no trainable parameters to snapshot for the SDPO teacher. Train a LoRA adapter "
                "(peft_config=LoraConfig(...)), or fine-tune the full model."
            )
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._backup: dict[str, torch.Tensor] = {}

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters as they are now (the ones the optimizer updates)."""
        return {
            name: p for raw, p in self.peft_model.named_parameters() if (name := _normalise_name(raw)) in self.names
        }

    @property
    def snapshot(self) -> dict[str, torch.Tensor]:
        params = self.params
        with torch.no_grad():
            if self._snapshot is None:
                self._snapshot = {n: local_shard(p).detach().clone() for n, p in params.items()}
            else:  # taken before accelerate prepared the model: follow the parameters to their shards and device
                for name, p in params.items():
                    self._snapshot[name] = _fit(self._snapshot[name], p)
        return self._snapshot

    @contextlib.contextmanager
    def swapped_in(self):
        """The teacher's values in the adapter's own tensors; the student's are restored bit for bit on exit."""
        params, snapshot = self.params, self.snapshot
        with torch.no_grad():
            for name, p in params.items():
                local = local_shard(p)
                backup = self._backup.get(name)
                if backup is None or backup.shape != local.shape or backup.device != local.device:
                    backup = self._backup[name] = torch.empty_like(local)
                backup.copy_(local)
            try:
                for name, p in params.items():
                    local_shard(p).copy_(snapshot[name])
                yield
            finally:
                for name, p in params.items():
                    local_shard(p).copy_(self._backup[name])

    def hidden_states(self, model, inputs, completion_length):
        with self.swapped_in(), eval_mode(model):
            return model(**inputs, sdpo=SDPORequest(completion_length))

    def lm_head_weight(self, model):
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        name = next((n for n, p in self.params.items() if p is weight), None)
        if name is None:  # the head is not trained by the adapter: teacher and student share it
            return full_weight(weight).detach()
        if not hasattr(weight, "full_tensor"):
            return self.snapshot[name]
        with self.swapped_in():  # sharded: gather the teacher's values (a collective: every rank is here)
            return weight.full_tensor().detach()

    def ema_step(self, student, generator=None):
        ema_update(
            self.snapshot, {n: local_shard(p) for n, p in self.params.items()}, self.ema_rate, generator=generator
        )

    def state_dict(self):
        """Whole tensors (FSDP2: gathered from every rank's shard, a collective), on the CPU."""
        params, out = self.params, {}
        for name, local in self.snapshot.items():
            p = params[name]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                local = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                local = local.full_tensor()
            out[name] = local.detach().cpu().clone()
        return out

    def load_state_dict(self, state):
        snapshot, params = self.snapshot, self.params
        missing, extra = sorted(snapshot.keys() - state.keys()), sorted(state.keys() - snapshot.keys())
        if missing or extra:
            raise ValueError(
                "The checkpoint's LoRA teacher does not match this run's adapter: "
                f"missing {missing[:3]}, unexpected {extra[:3]}. Resume with the same peft_config."
            )
        with torch.no_grad():
            for name, value in state.items():
                p = params[name]
                if hasattr(p, "device_mesh"):  # FSDP2: this rank's shard of the whole tensor
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements).to_local()
                snapshot[name].copy_(value)
