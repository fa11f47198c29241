"""`python -m sdpo_fast.preflight MODEL --dataset DATA --reward-funcs module:func [...]`: the check from a shell.

MODEL is a Hub name, a local folder, or `smollm2` (SmolLM2-135M-Instruct, converted offline by
`sdpo_fast.pretrained`). DATA is a `datasets.load_dataset` name or folder, or a .json/.jsonl/.csv/.parquet
file, with a `prompt` column. Each reward function is `module:function` or `path/to/file.py:function`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from ..config import SDPOConfig
from .check import preflight

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_function(spec: str):
    """`module:function` or `path/to/file.py:function` → the function, or an error that shows the expected form."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--reward-funcs {spec!r}: write each as module:function or path/to/file.py:function.")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise SystemExit(f"--reward-funcs {spec!r}: no file {path}.")
        sys.path.insert(0, str(path.parent.resolve()))  # so the file can import its siblings
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[path.stem] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise SystemExit(f"--reward-funcs {spec!r}: cannot import {module_name!r} ({err}).") from None
    if not hasattr(module, attr):
        raise SystemExit(f"--reward-funcs {spec!r}: {module_name} has no attribute {attr!r}.")
    return getattr(module, attr)


def load_data(name: str, split: str):
    from datasets import load_dataset

    path = Path(name)
    if path.suffix in FILE_FORMATS and path.is_file():
        return load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split=split)
    return load_dataset(name, split=split)


def load_model(name: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..pretrained import resolve_model

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype) if dtype != "auto" else "auto")
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def parse_sdpo(pairs: list[str]) -> SDPOConfig:
    """`--sdpo key=value` pairs (values as JSON, else as strings) → an SDPOConfig, validated by it."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--sdpo {pair!r}: write it as key=value, e.g. --sdpo success_reward_threshold=1.0.")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    try:
        return SDPOConfig(**settings)
    except TypeError as err:
        raise SystemExit(f"--sdpo: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpo_fast.preflight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model", help="Hub name, local folder, or `smollm2`.")
    parser.add_argument("--dataset", required=True, help="datasets name/folder, or a .json/.jsonl/.csv/.parquet file.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--reward-funcs", nargs="+", required=True, metavar="MODULE:FUNC")
    parser.add_argument("--reward-weights", nargs="+", type=float, default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="Sequences per generate call.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdpo", nargs="*", default=[], metavar="KEY=VALUE", help="SDPOConfig fields.")
    parser.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16, float16 or auto.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--json", default=None, metavar="PATH", help="Also write the report as JSON here.")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    funcs = [load_function(spec) for spec in args.reward_funcs]
    config = parse_sdpo(args.sdpo)
    dataset = load_data(args.dataset, args.split)
    model, tokenizer = load_model(args.model, args.dtype)
    report = preflight(
        model, tokenizer, dataset, funcs, sdpo_config=config, num_prompts=args.num_prompts,
        num_generations=args.num_generations, temperature=args.temperature,
        max_completion_length=args.max_completion_length, seed=args.seed, reward_weights=args.reward_weights,
        progress=not args.no_progress, batch_size=args.batch_size,
    )  # fmt: skip
    print(report.table())
    if args.json:
        report.to_json(args.json)
        print(f"\nWrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
