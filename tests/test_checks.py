"""Training data that would only fail at the first step fails at construction, with the fix."""

from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict, IterableDataset
from tiny_setup import chat_dataset, grpo_args, half_success, model, tokenizer

from sdpo_fast import SDPOConfig, SDPOTrainer
from sdpo_fast.checks import check_train_dataset


def _questions():
    return Dataset.from_dict({"question": ["what is 1 plus 1?"] * 4, "answer": ["2"] * 4})


@pytest.mark.parametrize("enabled", [True, False])  # plain GRPO (enabled=False) needs the column as much
def test_a_dataset_without_prompt_fails_at_construction_naming_the_fix(tmp_path, enabled):
    with pytest.raises(ValueError, match=r"no 'prompt' column \(its columns: 'question', 'answer'\).*rename_column"):
        SDPOTrainer(
            model(),
            half_success,
            args=grpo_args(tmp_path),
            sdpo_config=SDPOConfig(enabled=enabled, distillation_topk=10),
            train_dataset=_questions(),
            processing_class=tokenizer(),
        )


def test_the_same_dataset_renamed_constructs(tmp_path):
    renamed = _questions().rename_column("question", "prompt")
    trainer = SDPOTrainer(
        model(), half_success, args=grpo_args(tmp_path), train_dataset=renamed, processing_class=tokenizer()
    )
    assert trainer.train_dataset.column_names == ["prompt", "answer"]


def test_other_dataset_shapes():
    check_train_dataset(chat_dataset())
    check_train_dataset(None)  # TRL's own error for a missing dataset stands
    check_train_dataset([{"prompt": "p"}])
    with pytest.raises(ValueError, match=r"no 'prompt' column \(its columns: 'text'\)"):
        check_train_dataset([{"text": "p"}])
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'test'\].*dataset\['train'\]"):
        check_train_dataset(DatasetDict(train=chat_dataset(), test=chat_dataset()))
    streamed = _questions().to_iterable_dataset()
    assert isinstance(streamed, IterableDataset)
    with pytest.raises(ValueError, match="no 'prompt' column"):  # its features are known without reading it
        check_train_dataset(streamed)

    def rows():
        yield {"question": "q"}

    check_train_dataset(IterableDataset.from_generator(rows))  # columns unknown until read: TRL sees the rows
