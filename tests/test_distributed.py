"""Two-process CPU runs (gloo): demonstrations across ranks under DDP, the EMA teacher on FSDP2 shards.

Each scenario is one `torchrun --standalone --nproc_per_node 2` launch of a script in
`tests/distributed/` (a free port is picked by the launcher); every rank writes its results to files
and the tests below assert on them. One launch per scenario, shared by the tests that read it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sdpo_fast.reprompting import remove_thinking
from sdpo_fast.testing import tiny_tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
    ),
]

HERE = Path(__file__).parent
SCRIPTS = HERE / "distributed"
LAUNCH_TIMEOUT_S = 300


# A C++ abort from a thread destroyed while joinable: gloo and the rendezvous store can hit it when a
# loaded machine tears a group down. It is not an SDPO failure, so such a launch is run once more (only
# such a launch, and only once); any other failure fails at once.
TEARDOWN_ABORT = "terminate called without an active exception"


def _launch(script: str, *args: str, out_dir: Path, env: dict[str, str] | None = None) -> None:
    """Run `script` on two local processes; fail with the workers' errors if any rank wrote no result."""
    output, returncode = _launch_once(script, *args, out_dir=out_dir, env=env)
    if returncode != 0 and TEARDOWN_ABORT in output:
        shutil.rmtree(out_dir)  # the retry starts from nothing: no half-written results or checkpoints
        out_dir.mkdir(parents=True)
        (out_dir / "launch.first.log").write_text(output)
        output, returncode = _launch_once(script, *args, out_dir=out_dir, env=env)
    missing = [r for r in (0, 1) if not (out_dir / f"rank{r}.json").exists()]
    if returncode != 0 or missing:
        lines = output.splitlines()
        errors = [line for line in lines if "Error" in line and "ChildFailedError" not in line]
        pytest.fail(
            f"{' '.join([script, *args])} failed (exit {returncode}, no result from ranks {missing}).\n"
            + "\n".join(errors[-6:])
            + "\n--- output tail ---\n"
            + "\n".join(lines[-60:]),
            pytrace=False,
        )


def _launch_once(script: str, *args: str, out_dir: Path, env: dict[str, str] | None) -> tuple[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # single node, rendezvous on a free port
        "--nproc_per_node",
        "2",
        str(SCRIPTS / script),
        *args,
        str(out_dir),
    ]
    # Own session: a hung launch is ended by its id. torchrun passes SIGTERM on to its workers (each in a
    # session of its own), then anything left of the launcher's group is killed.
    proc = subprocess.Popen(
        cmd,
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        output += f"\n[timed out after {LAUNCH_TIMEOUT_S} s]"
    (out_dir / "launch.log").write_text(output)
    return output, proc.returncode


def _results(out_dir: Path, tensors: bool = False) -> list[dict]:
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    if tensors:
        for r, result in enumerate(results):
            result["tensors"] = torch.load(out_dir / f"rank{r}.pt", weights_only=True)
    return results


def _train(tmp_path_factory, mode: str, resume_from: Path | None = None) -> list[dict]:
    out_dir = tmp_path_factory.mktemp(f"train_{mode}")
    env = {"SDPO_RESUME_FROM": str(resume_from)} if resume_from else None
    _launch("train_step.py", mode, out_dir=out_dir, env=env)
    results = _results(out_dir, tensors=True)
    for r in results:
        r["out_dir"] = out_dir
    return results


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return _train(tmp_path_factory, "ddp")


@pytest.fixture(scope="module")
def fsdp_ema_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp_ema")
    _launch("fsdp_ema.py", out_dir=out_dir)
    return _results(out_dir)


def _contains(sequence: list[int], sub: list[int]) -> bool:
    return any(sequence[i : i + len(sub)] == sub for i in range(len(sequence) - len(sub) + 1))


def _demo_ids(tok, completion_text: str) -> list[int]:
    """The tokens a completion contributes as a demonstration (thinking removed, re-tokenised)."""
    return tok(remove_thinking(completion_text), add_special_tokens=False)["input_ids"]


def _prompt_part(result: dict, row: int) -> list[int]:
    width = len(result["completion_ids"][row])
    return result["teacher_input_ids"][row][:-width]


def check_demonstrations_cross_ranks(results: list[dict]) -> None:
    tok = tiny_tokenizer()
    r0, r1 = results
    assert [r["world_size"] for r in results] == [2, 2] and {r["backend"] for r in results} == {"gloo"}
    assert [r["num_generation_batches"] for r in results] == [1, 1]
    # Rank 1 holds global samples 2 and 3, the group's only successes: sample 2 is the first.
    first_success, second_success = r1["completion_texts"]
    assert first_success.strip() and remove_thinking(first_success) != remove_thinking(second_success)
    assert first_success not in r0["completion_texts"], "the demonstration must be told apart from rank 0's text"
    demo = _demo_ids(tok, first_success)
    for row, text in enumerate(r0["teacher_texts"]):
        assert text.startswith("user what is 2 plus 3?"), text
        assert f"correct solution : {tok.decode(demo)}" in text, (text, first_success)
        assert _contains(_prompt_part(r0, row), demo), (text, first_success)
        assert not _contains(_prompt_part(r0, row), _demo_ids(tok, second_success))
    assert r0["self_distillation_mask"] == [1.0, 1.0]
    # Rank 1's samples each get the *other* success (never themselves), as on one process.
    for row, sibling in ((0, second_success), (1, first_success)):
        assert _contains(_prompt_part(r1, row), _demo_ids(tok, sibling)), (r1["teacher_texts"][row], sibling)
    assert r1["self_distillation_mask"] == [1.0, 1.0]
    for r in results:
        assert r["teacher_tail_is_completion"]
        # loss normalisers are counted over the whole (two-process) generation batch
        assert r["sdpo_num_seqs"] == 4.0 and r["sdpo_num_active_seqs"] == 4.0


def check_step(results: list[dict], kind: str = "full-copy") -> None:
    """Both ranks ran one step with a finite, positive loss; weights agree; the EMA teacher moved exactly."""
    t0, t1 = (r["tensors"] for r in results)
    for r in results:
        assert len(r["losses"]) == 1 and math.isfinite(r["losses"][0]) and r["losses"][0] > 0, r["losses"]
        assert r["global_step"] == 1 and r["ema_fired_at"] == [1]
    assert torch.equal(t0["student_before"], t1["student_before"])
    assert torch.equal(t0["teacher_before"], t0["student_before"])  # the teacher starts as the policy
    assert (t0["student_after"] - t0["student_before"]).abs().max() > 1e-3  # the step moved the student
    assert torch.equal(t0["student_after"], t1["student_after"]), "student weights diverged across ranks"
    assert torch.equal(t0["teacher_after"], t1["teacher_after"]), "EMA teachers diverged across ranks"
    rate = results[0]["ema_rate"]
    for t in (t0, t1):
        expected = torch.lerp(t["teacher_before"], t["student_after"], rate)
        torch.testing.assert_close(t["teacher_after"], expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(t["teacher_after"], t["teacher_before"])
    # the step's checkpoint (written by rank 0 only) holds that EMA teacher, gathered whole
    checkpoint = results[0]["checkpoint_teacher"]
    assert checkpoint is not None and results[1]["checkpoint_teacher"] is None
    assert checkpoint["kind"] == kind and checkpoint["missing"] == [] and checkpoint["max_diff"] == 0.0


def check_same_as_ddp(results: list[dict], ddp: list[dict]) -> None:
    """Same seeds and data: the FSDP2 step must reproduce the DDP step."""
    for r, d in zip(results, ddp):
        assert r["completion_ids"] == d["completion_ids"] and r["teacher_input_ids"] == d["teacher_input_ids"]
        assert r["losses"] == pytest.approx(d["losses"], rel=1e-4)
        for key in ("student_after", "teacher_after"):
            torch.testing.assert_close(r["tensors"][key], d["tensors"][key], rtol=1e-5, atol=1e-6)


def check_fsdp2_sharded(results: list[dict]) -> None:
    for r in results:
        assert r["distributed_type"] == "DistributedType.FSDP" and r["is_fsdp_enabled"], r["distributed_type"]
        for key in ("student_sharding", "teacher_sharding"):
            layout = r[key]
            assert layout["types"] == ["DTensor"] and layout["placements"] == ["(Shard(dim=0),)"], layout
            assert layout["mesh_sizes"] == [2] and layout["local_numel"] < layout["full_numel"], layout


# ---------------------------------------------------------------------------------------------- DDP


def test_two_process_demonstration_comes_from_the_other_rank(ddp_run):
    assert {r["distributed_type"] for r in ddp_run} == {"DistributedType.MULTI_CPU"}
    assert {r["student_wrapper"] for r in ddp_run} == {"DistributedDataParallel"}
    check_demonstrations_cross_ranks(ddp_run)


def test_two_process_step_keeps_ranks_identical_and_updates_ema_teacher(ddp_run):
    check_step(ddp_run)


# ---------------------------------------------------------------------------------------------- FSDP2: the EMA


def test_fsdp2_ema_on_local_shards_matches_single_process(fsdp_ema_run):
    for r in fsdp_ema_run:
        fp32 = r["fp32"]
        for layout in (fp32["student_layout"], fp32["teacher_layout"]):
            assert layout["all_dtensor"] and layout["all_shard0"] and layout["local_numel"] < layout["full_numel"]
        assert len(fp32["rounds"]) == 2
        for rnd in fp32["rounds"]:
            assert rnd["teacher_moved"] > 1e-3  # the update did something ...
            assert rnd["max_diff_vs_single_process"] <= 1e-6  # ... and exactly the unsharded EMA
            assert rnd["logits_max_diff"] <= 1e-5  # FSDP's next all-gather sees the updated shards
            assert rnd["layout_after"]["all_dtensor"]
    local_sizes = [r["fp32"]["teacher_layout"]["local_numel"] for r in fsdp_ema_run]
    assert local_sizes[0] != local_sizes[1], local_sizes  # uneven (padded) shards were covered


def test_fsdp2_bf16_teacher_stochastic_rounding_on_shards(fsdp_ema_run):
    for r in fsdp_ema_run:
        bf16 = r["bf16"]
        assert bf16["dtype"] == "torch.bfloat16" and bf16["layout"]["all_dtensor"]
        assert bf16["within_one_spacing"], bf16  # each element is a bf16 neighbour of the exact fp32 EMA
        assert 0 < bf16["elements_not_round_to_nearest"] < bf16["elements"], bf16  # and rounding was stochastic
        assert bf16["teacher_moved"] > 0


def test_fsdp2_ema_refuses_teacher_left_unsharded_after_forward(fsdp_ema_run):
    """With reshard_after_forward=False a no-grad forward leaves full tensors registered: no silent mismatch."""
    for r in fsdp_ema_run:
        u = r["unresharded"]
        assert not u["after_forward_layout"]["all_dtensor"]
        assert u["error"] is not None and "shape" in u["error"], u["error"]
        assert u["after_reshard_layout"]["all_dtensor"]
        assert u["after_reshard_max_diff"] <= 1e-6


# ---------------------------------------------------------------------------------------------- FSDP2: the trainer


def test_fsdp2_trainer_step_matches_ddp(tmp_path_factory, ddp_run):
    results = _train(tmp_path_factory, "fsdp2")
    check_fsdp2_sharded(results)
    check_demonstrations_cross_ranks(results)
    check_step(results)
    check_same_as_ddp(results, ddp_run)


def test_fsdp2_trainer_step_with_reshard_after_forward_false(tmp_path_factory, ddp_run):
    """SHARD_GRAD_OP (`reshard_after_forward=False`, also what `fsdp="shard_grad_op"` maps to) must train too."""
    results = _train(tmp_path_factory, "fsdp2-shard-grad-op")
    check_fsdp2_sharded(results)
    check_step(results)
    check_same_as_ddp(results, ddp_run)


def test_fsdp2_ranks_with_and_without_teacher_rows_stay_in_step(tmp_path_factory):
    """Rank 1 has no teacher row and rank 0 two (one per teacher chunk): every FSDP collective must still pair up."""
    results = _train(tmp_path_factory, "fsdp2-asymmetric")
    check_fsdp2_sharded(results)
    r0, r1 = results
    assert r0["self_distillation_mask"] == [1.0, 1.0] and r1["self_distillation_mask"] == [0.0, 0.0]
    assert all(len(r["losses"]) == 1 and math.isfinite(r["losses"][0]) for r in results)
    assert r0["losses"][0] > 0 and r1["losses"][0] == 0.0
    t0, t1 = r0["tensors"], r1["tensors"]
    assert torch.equal(t0["student_after"], t1["student_after"]) and torch.equal(
        t0["teacher_after"], t1["teacher_after"]
    )
    assert (t0["student_after"] - t0["student_before"]).abs().max() > 0  # rank 0's loss reached both ranks


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3


def _require_deepspeed() -> None:
    """DeepSpeed is in the dev extra: in CI its absence is a failure, elsewhere a reasoned skip."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail('DeepSpeed is missing: `pip install -e ".[dev]"` installs it for the ZeRO-3 tests.')
        pytest.skip("DeepSpeed is not installed (pip install deepspeed)")


def check_zero3_partitioned(results: list[dict]) -> None:
    for r in results:
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["teacher_kind"] == "Zero3Teacher"
        for key in ("student_sharding", "teacher_sharding"):
            layout = r[key]  # every parameter partitioned: each rank holds half of it (between forwards)
            assert layout["zero3_partitioned"] and layout["local_numel"] < layout["full_numel"], layout


def test_zero3_trainer_step_matches_ddp(tmp_path_factory, ddp_run):
    """A plain model handed in, partitioned by DeepSpeed at train time; the fused head gathers lm_head itself."""
    _require_deepspeed()
    results = _train(tmp_path_factory, "zero3")
    check_zero3_partitioned(results)
    check_demonstrations_cross_ranks(results)
    check_step(results)  # ranks identical, shard-wise EMA exact, checkpoint = the gathered teacher
    check_same_as_ddp(results, ddp_run)
    for r in results:  # PEFT under ZeRO-3 is refused before anything is built, naming what works
        assert "ZeRO-2" in r["peft_refusal"] and "full model under ZeRO-3" in r["peft_refusal"]


def test_zero3_teacher_of_a_model_loaded_under_zero_init_saves_and_resumes(tmp_path_factory):
    """`from_pretrained` under ZeRO-3 partitions the student at load: the teacher is copied partition by partition.

    Then a second launch resumes that run's checkpoint: the restored teacher is the saved one, exactly.
    """
    _require_deepspeed()
    results = _train(tmp_path_factory, "zero3-init")
    check_zero3_partitioned(results)
    check_step(results)  # also: the teacher starts exactly as the policy, without any gather
    checkpoint = results[0]["out_dir"] / "run" / "checkpoint-1"
    resumed = _train(tmp_path_factory, "zero3-init", resume_from=checkpoint)
    for r, first in zip(resumed, results):
        assert r["global_step"] == 2
        assert torch.equal(r["tensors"]["teacher_at_resume"], first["tensors"]["teacher_after"])


def test_zero3_trust_region_teacher_trains(tmp_path_factory):
    """The live student's lm_head is read outside its forward: the trust-region blend must gather it itself."""
    _require_deepspeed()
    results = _train(tmp_path_factory, "zero3-trust")
    t0, t1 = (r["tensors"] for r in results)
    for r in results:
        assert len(r["losses"]) == 1 and math.isfinite(r["losses"][0]) and r["ema_fired_at"] is None
    assert (
        torch.equal(t0["student_after"], t1["student_after"])
        and (t0["student_after"] - t0["student_before"]).abs().max() > 0
    )
    assert torch.equal(t0["teacher_after"], t0["teacher_before"])  # the frozen initial model


def test_zero3_nonfinite_step_is_counted_and_skips_the_ema(tmp_path_factory):
    """DeepSpeed keeps gradients in its own buffers and skips an overflowing step itself: SDPO reads its verdict."""
    _require_deepspeed()
    results = _train(tmp_path_factory, "zero3-nan")
    for r in results:
        assert r["skipped_steps"] == [1] and r["ema_fired_at"] == []
        t = r["tensors"]
        assert torch.equal(t["student_after"], t["student_before"]) and torch.equal(
            t["teacher_after"], t["teacher_before"]
        )


# ---------------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def ddp_lora_run(tmp_path_factory):
    return _train(tmp_path_factory, "ddp-lora")


def test_lora_snapshot_teacher_under_ddp(ddp_lora_run):
    check_step(ddp_lora_run, kind="lora-snapshot")


def test_lora_snapshot_teacher_under_fsdp2_matches_ddp(tmp_path_factory, ddp_lora_run):
    """FSDP2 replaces every parameter by a DTensor at prepare time: the snapshot follows them, shard by shard."""
    results = _train(tmp_path_factory, "fsdp2-lora")
    check_step(results, kind="lora-snapshot")
    check_same_as_ddp(results, ddp_lora_run)
