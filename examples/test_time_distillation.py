"""Test-time self-distillation against best-of-k, at the same attempt budget.

    python examples/test_time_distillation.py --smoke                      # tiny built-in model, seconds on a CPU
    python examples/test_time_distillation.py --model Qwen/Qwen3-0.6B --budget 64 --questions 8

The toy task, "secret word": each question has a secret word drawn from 40 candidates, known only to
the reward function. A wrong attempt scores 0 with the feedback "expected <word>", the shape of a
failing unit-test report. Sampling from the question alone finds the word with probability 1/40 per
attempt; a model that reads the feedback in its context solves it in the next round. Best-of-k never
shows the model that feedback; `test_time_self_distill(mode="reprompt")` does, through the training
templates, and `mode="train"` distils it into the weights with SDPO.

`--smoke` uses a one-layer Qwen2 from `sdpo_fast.testing` whose weights are set in code (see
`wired_copier`): it answers with a random candidate word, unless its context holds one, which it
copies. A short gradient warm-up teaching a random tiny model to copy takes minutes on 2 CPU cores
(copying appears late in training), so the smoke run wires the behaviour in instead. Its train mode
uses plain SGD (lr 0.02): Adam's normalised steps would move the wired zeros as far as the useful weights.

For each method the table shows discovery@k, the fraction of questions solved within k attempts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import math
import random
import re
import time
import warnings

import torch

from sdpo_fast import SDPOConfig, test_time_self_distill
from sdpo_fast.testing import BASE_WORDS, tiny_qwen2, tiny_tokenizer

KEYS = ["x", "y", "z", "n", "i", "j", "k"]
QUESTION = "what is the secret word of {key} ?"


def _words(*texts: str) -> set[str]:
    return set(re.findall(r"[a-z]+", " ".join(texts).lower()))


# Words of the question, the chat template, the reprompt templates and the feedback are never answers,
# so that the wired model's context holds an answer word only where the feedback put one.
_TEMPLATES = SDPOConfig()
_NOT_ANSWERS = _words(
    QUESTION,
    "system user assistant expected",
    _TEMPLATES.reprompt_template,
    _TEMPLATES.solution_template,
    _TEMPLATES.feedback_template,
)
ANSWERS = [w for w in BASE_WORDS if w.isalpha() and w not in _NOT_ANSWERS and w not in KEYS][:40]

# ---------------------------------------------------------------------------------------------- the task


def make_question(seed: int, list_candidates: bool) -> tuple[list[dict[str, str]], str]:
    """A chat prompt and its secret word. Real models get the candidate list, so that guessing is 1/40."""
    rng = random.Random(f"secret-word-{seed}")  # not the sampling seed: keeps the two streams unrelated
    secret, key = rng.choice(ANSWERS), rng.choice(KEYS)
    text = QUESTION.format(key=key)
    if list_candidates:
        text = (
            f"Guess the secret word of {key}. It is one of: {', '.join(ANSWERS)}. Reply with that one word only, "
            "in lower case."
        )
    return [{"role": "user", "content": text}], secret


def secret_word_reward(prompts, completions, secret, **kwargs) -> list[dict]:
    """1 for the secret word as the first word of the answer, else 0 and the feedback "expected <word>"."""
    out = []
    for completion, target in zip(completions, secret):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        words = re.findall(r"[a-z]+", re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).lower())
        solved = bool(words) and words[0] == target
        out.append({"score": float(solved), "feedback": None if solved else f"expected {target}"})
    return out


# ---------------------------------------------------------------------------------------------- the wired tiny model


@torch.no_grad()
def wired_copier(tokenizer) -> torch.nn.Module:
    """A one-layer Qwen2 that copies an answer word from its context, else answers a uniformly random one.

    Residual coordinates are token one-hots plus a flag marking answer words. Attention looks only at
    answer-word positions (keys fire on the flag; queries and keys live in RoPE's lowest-frequency
    pair, so the score ignores distance) and copies their one-hot; a value bias adds the same logit to
    every answer, which is all there is when the context has none. The MLP turns "the current token is
    an answer word" into end-of-sequence.
    """
    vocab, d = len(tokenizer), 256
    model = tiny_qwen2(
        tokenizer,
        hidden_size=d,
        intermediate_size=2,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    for p in model.parameters():
        p.zero_()
    answers = tokenizer.convert_tokens_to_ids(ANSWERS)
    flag, lowest = vocab, d // 2 - 1  # the flag coordinate; RoPE's lowest-frequency dimension
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
    model.model.embed_tokens.weight[answers, flag] = 1.0
    model.lm_head.weight[:, :vocab] = torch.eye(vocab)
    layer.input_layernorm.weight.fill_(d**-0.5)  # RMSNorm of a one-hot: back to (about) the one-hot
    attn.q_proj.bias[lowest] = 1.0
    attn.k_proj.weight[lowest, flag] = 60.0 * d**0.5  # score ≈ 30 on answer words, 0 elsewhere
    attn.v_proj.weight[answers, answers] = 28.0
    attn.v_proj.bias[answers] = 3.0
    attn.o_proj.weight[:vocab, :vocab] = torch.eye(vocab)
    layer.post_attention_layernorm.weight[flag] = 1.0
    mlp.gate_proj.weight[0, flag] = mlp.up_proj.weight[0, flag] = 5.0
    mlp.down_proj.weight[tokenizer.eos_token_id, 0] = 5.0
    model.model.norm.weight.fill_(4.0)  # the logit scale
    return model.eval()


# ---------------------------------------------------------------------------------------------- the comparison


def run_method(method: str, model, tokenizer, args, list_candidates: bool) -> list[int | None]:
    """discovery@k of one method on every question (None: not solved within the budget)."""
    found = []
    for q in range(args.questions):
        prompt, secret = make_question(args.seed + q, list_candidates)
        with _quiet(not args.verbose):
            result = test_time_self_distill(
                model if method != "train" else _fresh(model),
                tokenizer,
                prompt,
                secret_word_reward,
                mode=method,
                budget=args.budget,
                # Best-of-k draws independent samples, so its discovery@k does not depend on batching: one round.
                num_candidates=args.budget if method == "best_of_k" else args.candidates,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                reward_kwargs={"secret": secret},
                chat_template_kwargs=args.chat_template_kwargs,
                sdpo_config=args.sdpo_config,
                peft_config=args.peft_config,
                trainer_args=args.trainer_args,
                seed=args.seed + q,
            )
        if result.interrupted:
            raise KeyboardInterrupt
        found.append(result.discovery_at_k)
    return found


def _quiet(enabled: bool):
    """Hide the trainer's printed metrics dicts (it prints them whatever the logging level)."""
    return contextlib.redirect_stdout(io.StringIO()) if enabled else contextlib.nullcontext()


def _fresh(model):
    """Train mode changes the weights: every question starts from the same model."""
    return copy.deepcopy(model)


def discovery_table(results: dict[str, list[int | None]], budget: int, candidates: int) -> str:
    ks = sorted({*(candidates * 2**i for i in range(int(math.log2(max(budget // candidates, 1))) + 1)), budget})
    rows = [f"{'method':<10}" + "".join(f"{'k=' + str(k):>8}" for k in ks) + f"{'mean k':>9}"]
    for method, found in results.items():
        rates = [sum(f is not None and f <= k for f in found) / len(found) for k in ks]
        solved = [f for f in found if f is not None]
        mean = f"{sum(solved) / len(solved):.1f}" if solved else "-"
        rows.append(f"{method:<10}" + "".join(f"{r:>8.2f}" for r in rates) + f"{mean:>9}")
    return "\n".join(rows)


def attempts_to_match(found: list[int | None], baseline: list[int | None], budget: int) -> int | None:
    """The fewest attempts at which `found` solves as many questions as `baseline` does with the full budget."""
    target = sum(f is not None for f in baseline)
    for k in range(1, budget + 1):
        if sum(f is not None and f <= k for f in found) >= target:
            return k
    return None


# ---------------------------------------------------------------------------------------------- setup


def smoke_setup(args):
    tokenizer = tiny_tokenizer(extra_words=["secret"])
    args.sdpo_config = SDPOConfig(distillation_topk=None)
    args.trainer_args = {"learning_rate": 0.02, "optim": "sgd"}
    args.max_new_tokens = 4
    return wired_copier(tokenizer), tokenizer


def model_setup(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    if torch.cuda.is_available():
        model = model.cuda()
    args.sdpo_config = SDPOConfig(distillation_alpha=1.0, distillation_topk=20, teacher_update_rate=0.01)
    args.trainer_args = {"learning_rate": args.lr}
    if args.lora:
        from peft import LoraConfig

        args.peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    return model, tokenizer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--smoke", action="store_true", help="the wired tiny model (no download)")
    which.add_argument("--model", help="a causal LM name or path")
    parser.add_argument("--methods", default=None, help="comma-separated: best_of_k,reprompt,train")
    parser.add_argument("--questions", type=int, default=None, help="questions (one seed each) per method")
    parser.add_argument("--budget", type=int, default=32, help="attempts per question")
    parser.add_argument("--candidates", type=int, default=4, help="attempts per round")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-5, help="train mode with --model")
    parser.add_argument("--lora", action="store_true", help="train mode with --model: LoRA adapters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round")
    args = parser.parse_args()
    args.methods = (args.methods or ("best_of_k,reprompt,train" if args.smoke else "best_of_k,reprompt")).split(",")
    args.questions = args.questions or 8
    args.chat_template_kwargs = None if args.smoke else {"enable_thinking": False}
    args.peft_config = None
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:  # transformers' deprecation notices about TRL's own settings
        warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    model, tokenizer = smoke_setup(args) if args.smoke else model_setup(args)
    if not args.verbose:
        args.trainer_args["disable_tqdm"] = True
    results, start = {}, time.perf_counter()
    for method in args.methods:
        began = time.perf_counter()
        results[method] = run_method(method, model, tokenizer, args, list_candidates=not args.smoke)
        print(f"{method}: {args.questions} questions in {time.perf_counter() - began:.1f} s")
    print(f"\ndiscovery@k over {args.questions} questions, budget {args.budget}, {args.candidates} attempts/round:")
    print(discovery_table(results, args.budget, args.candidates))
    baseline = results.get("best_of_k")
    if baseline and any(f is not None for f in baseline):
        for method in (m for m in results if m != "best_of_k"):
            k = attempts_to_match(results[method], baseline, args.budget)
            ratio = f"{args.budget / k:.1f}× fewer attempts" if k else "not within the budget"
            print(f"{method} matches best-of-{args.budget}'s solve rate with {k} attempts ({ratio})")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
