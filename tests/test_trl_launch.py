"""`SDPOConfig` under TRL's standard launch: `HfArgumentParser`/`TrlParser`, flags, a YAML file, the example script."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import HfArgumentParser
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser

from sdpo_fast import SDPOConfig

ROOT = Path(__file__).resolve().parent.parent
CPU_FLAGS = ["--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none"]


def _still_a_working_class() -> None:
    """What every later user of the class needs, whatever a parser did to it before."""
    assert SDPOConfig() == SDPOConfig(distillation_topk=100, teacher_micro_batch_size=None, is_clip=2.0)
    assert SDPOConfig(distillation_topk=None, is_clip=None).distillation_topk is None
    with pytest.raises(TypeError, match="enabled must be True or False"):
        SDPOConfig(enabled="no")  # the strict type checks still hold
    with pytest.raises(TypeError, match="max_reprompt_len must be an int"):
        SDPOConfig(max_reprompt_len=True)


def test_hf_argument_parser_with_no_arguments_gives_the_defaults_and_leaves_the_class_usable():
    (parsed,) = HfArgumentParser(SDPOConfig).parse_args_into_dataclasses(args=[])
    assert parsed == SDPOConfig()
    _still_a_working_class()
    (again,) = HfArgumentParser(SDPOConfig).parse_args_into_dataclasses(args=[])  # a second parser, same class
    assert again == SDPOConfig()


def test_hf_argument_parser_reads_flags_of_every_kind():
    (parsed,) = HfArgumentParser(SDPOConfig).parse_args_into_dataclasses(
        args=["--distillation_topk", "20", "--enabled", "false", "--grpo_weight", "0.25", "--teacher_dtype", "float32"]
    )
    assert (parsed.distillation_topk, parsed.enabled, parsed.grpo_weight) == (20, False, 0.25)
    assert parsed.teacher_dtype == "float32" and parsed.teacher_micro_batch_size is None
    with pytest.raises(ValueError, match="Unknown loss_agg_mode"):  # the config's own validation still runs
        HfArgumentParser(SDPOConfig).parse_args_into_dataclasses(args=["--loss_agg_mode", "token-sum"])
    _still_a_working_class()


def _trl_parse(args: list[str]):
    return TrlParser((ScriptArguments, SDPOConfig, GRPOConfig, ModelConfig)).parse_args_and_config(args)


def test_trl_parser_beside_grpo_and_model_config_from_flags(tmp_path):
    script, sdpo, grpo, model = _trl_parse(
        [
            *("--output_dir", str(tmp_path), *CPU_FLAGS, "--num_generations", "4", "--teacher_update_rate", "0.01"),
            *("--distillation_topk", "none", "--model_name_or_path", "tiny", "--dataset_name", "d"),
        ]
    )
    assert isinstance(sdpo, SDPOConfig) and isinstance(grpo, GRPOConfig)
    assert (sdpo.teacher_update_rate, sdpo.distillation_topk) == (0.01, None)
    assert (grpo.num_generations, grpo.output_dir, model.model_name_or_path) == (4, str(tmp_path), "tiny")
    assert script.dataset_name == "d"
    _still_a_working_class()


def test_trl_parser_from_yaml_with_flag_overrides(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "out"),
                "num_generations": 4,
                "success_reward_threshold": 0.75,
                "distillation_topk": None,
                "teacher_micro_batch_size": 2,
                "include_environment_feedback": False,
                "model_name_or_path": "tiny",
            }
        )
    )
    _, sdpo, grpo, model = _trl_parse(["--config", str(config), *CPU_FLAGS, "--success_reward_threshold", "0.9"])
    assert sdpo.success_reward_threshold == 0.9  # the flag wins over the file
    assert (sdpo.distillation_topk, sdpo.teacher_micro_batch_size, sdpo.include_environment_feedback) == (
        None,
        2,
        False,
    )
    assert grpo.num_generations == 4 and model.model_name_or_path == "tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ndistillation_add_tail: maybe\n")
    with pytest.raises(SystemExit):  # argparse's own refusal, naming the field
        _trl_parse(["--config", str(bad), *CPU_FLAGS])
    assert "distillation_add_tail" in capsys.readouterr().err
    _still_a_working_class()


def test_the_shipped_yaml_parses_into_all_four_dataclasses():
    _, sdpo, grpo, model = _trl_parse(["--config", str(ROOT / "examples" / "sdpo_trl_launch.yaml"), *CPU_FLAGS])
    fields = {f.name for f in dataclasses.fields(SDPOConfig)}
    written = yaml.safe_load((ROOT / "examples" / "sdpo_trl_launch.yaml").read_text())
    for key in fields & written.keys():
        assert getattr(sdpo, key) == written[key], key
    assert grpo.num_generations == written["num_generations"] and model.model_name_or_path == "tiny"


def test_the_launch_script_trains_the_tiny_model_from_the_yaml(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "examples" / "sdpo_trl_launch.py"), "--config", "sdpo_trl_launch.yaml"),
            *(*CPU_FLAGS, "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4"),
            *("--num_generations", "4", "--max_completion_length", "4", "--teacher_update_rate", "0.5"),
        ],
        cwd=ROOT / "examples",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "'self_distillation/reprompt_sample_fraction'" in proc.stdout + proc.stderr  # SDPO ran, not plain GRPO
    assert (out / "model.safetensors").exists() or any(out.glob("*.safetensors"))
