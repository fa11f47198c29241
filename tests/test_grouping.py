"""Which rollouts share demonstrations: the completions of one dataset row (GRPO's group, the reference's uid), or
the rows a dataset `uid` column names together, with a warning when that uid joins different questions."""

from __future__ import annotations

import warnings

import pytest
from datasets import Dataset
from tiny_setup import first_batch, make_trainer

from sdpo_fast import SDPOConfig
from sdpo_fast.reprompting import PromptCodec, group_key
from sdpo_fast.teacher_batch import ScoredRollouts, build_teacher_batch, row_columns
from sdpo_fast.testing import tiny_tokenizer

Q = [{"role": "user", "content": "what is 2 plus 2?"}]
Q2 = [{"role": "user", "content": "what is 3 plus 3?"}]


def _batch(rollouts: ScoredRollouts):
    n = len(rollouts.prompts)
    return build_teacher_batch(rollouts, PromptCodec(tiny_tokenizer()), SDPOConfig(), start=0, count=n, pad_id=0)


def _demonstrated(batch) -> list[float]:
    return batch.self_distillation_mask.tolist()  # no feedback here: 1 exactly where a demonstration was found


def test_group_key_row_and_uid_precedence():
    assert group_key("q", row=0) != group_key("q", row=1)
    assert group_key("q", uid=7, row=0) == group_key("other", uid=7, row=1)
    assert group_key("q", uid=1) != group_key("q", uid="1")  # a uid's type is part of it


def test_identical_prompts_on_different_rows_do_not_share_demonstrations():
    # Two rows with the same question and different hidden answers: row 0 fails twice, row 1 succeeds twice.
    rollouts = ScoredRollouts(
        prompts=[Q] * 4, completions=["5", "6", "4", "4"], feedback=[None] * 4, scores=[0.0, 0.0, 1.0, 1.0],
        group_size=2, columns=[row_columns({"answer": a}) for a in ("5", "5", "4", "4")],
    )  # fmt: skip
    batch = _batch(rollouts)
    assert _demonstrated(batch) == [0.0, 0.0, 1.0, 1.0]  # row 1's "4" is never row 0's "Correct solution"
    assert batch.group_pass_rate.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert batch.metrics["self_distillation/success_group_fraction"] == 0.5
    assert batch.warnings == {}


def test_without_row_information_the_prompt_is_the_group():
    # A caller that knows no rows (group_size=None) keeps the prompt-text grouping, documented as such.
    rollouts = ScoredRollouts(
        prompts=[Q] * 4, completions=["5", "6", "4", "4"], feedback=[None] * 4, scores=[0, 0, 1, 1]
    )
    assert _demonstrated(_batch(rollouts)) == [1.0, 1.0, 1.0, 1.0]


def test_a_uid_shared_by_different_prompts_is_honoured_and_warned_about():
    rollouts = ScoredRollouts(
        prompts=[Q, Q, Q2, Q2], completions=["4", "4", "7", "8"], feedback=[None] * 4, scores=[1.0, 1.0, 0.0, 0.0],
        uids=[7, 7, 7, 7], group_size=2,
    )  # fmt: skip
    batch = _batch(rollouts)
    assert _demonstrated(batch) == [1.0, 1.0, 1.0, 1.0]  # the uid is the user's grouping
    assert set(batch.warnings) == {"uid_prompts"}
    message = batch.warnings["uid_prompts"]
    assert "uid 7 is shared by different prompts" in message
    assert "'what is 2 plus 2?'" in message and "'what is 3 plus 3?'" in message
    assert "own uid" in message and "drop the uid column" in message


def test_a_uid_joining_rows_with_different_targets_is_warned_about():
    rollouts = ScoredRollouts(
        prompts=[Q] * 4, completions=["4", "4", "5", "5"], feedback=[None] * 4, scores=[1.0, 1.0, 0.0, 0.0],
        uids=["u"] * 4, group_size=2,
        columns=[row_columns({"answer": a, "level": 1}) for a in ("4", "4", "5", "5")],
    )  # fmt: skip
    batch = _batch(rollouts)
    assert set(batch.warnings) == {"uid_columns"}
    assert "uid 'u' joins rows whose answer differ" in batch.warnings["uid_columns"]


def test_a_consistent_uid_merges_rows_silently():
    # The same question twice in the dataset, one uid: merging them is what the uid says, and nothing differs.
    rollouts = ScoredRollouts(
        prompts=[Q] * 4, completions=["5", "6", "4", "4"], feedback=[None] * 4, scores=[0.0, 0.0, 1.0, 1.0],
        uids=["u"] * 4, group_size=2, columns=[row_columns({"answer": "4"})] * 4,
    )  # fmt: skip
    batch = _batch(rollouts)
    assert _demonstrated(batch) == [1.0, 1.0, 1.0, 1.0]
    assert batch.warnings == {}


def test_row_columns_and_group_size_checks():
    a = row_columns({"prompt": "p", "uid": 1, "answer": "4", "tests": [1, 2]})
    assert set(a) == {"answer", "tests"}
    assert a == row_columns({"prompt": "other", "uid": 2, "answer": "4", "tests": [1, 2]})
    assert a["answer"] != row_columns({"answer": "5"})["answer"]
    with pytest.raises(ValueError, match="do not form groups of group_size=3"):
        ScoredRollouts(prompts=["q"] * 4, completions=["c"] * 4, feedback=[None] * 4, scores=[0.0] * 4, group_size=3)


# ------------------------------------------------------------------ end to end


def by_answer(completions, answer, **kwargs):
    return [1.0 if a == "4" else 0.0 for a in answer]


def _two_rows(**columns) -> Dataset:
    return Dataset.from_dict({"prompt": [Q, Q], "answer": ["4", "5"], **columns})


def test_trainer_groups_by_dataset_row(tmp_path):
    trainer = make_trainer(
        tmp_path, reward=by_answer, dataset=_two_rows(), num_generations=2, max_steps=1,
        sdpo=SDPOConfig(distillation_topk=10, success_reward_threshold=0.5),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs = first_batch(trainer)
    metrics = trainer._metrics["train"]
    assert metrics["self_distillation/success_group_fraction"][-1] == 0.5  # two groups, one with successes
    assert metrics["self_distillation/reprompt_sample_fraction"][-1] == 0.5  # only the answer-"4" row
    assert inputs["self_distillation_mask"].sum() == 2
    assert not [w for w in caught if "uid" in str(w.message)]


def test_trainer_warns_once_about_a_uid_shared_by_different_prompts(tmp_path):
    ds = Dataset.from_dict({"prompt": [Q, Q2], "answer": ["4", "6"], "uid": ["same", "same"]})
    trainer = make_trainer(tmp_path, reward=by_answer, dataset=ds, num_generations=2, max_steps=1)
    with pytest.warns(UserWarning, match="uid 'same' is shared by different prompts") as caught:
        first_batch(trainer)
    assert sum("uid 'same'" in str(w.message) for w in caught) == 2  # one per kind: prompts and answer differ
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        first_batch(trainer)
    assert not [w for w in again if "uid 'same'" in str(w.message)]
