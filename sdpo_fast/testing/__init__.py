"""Tiny models and tokenizers built in code, for tests, examples, benchmarks and offline smoke runs.

Nothing here touches a model hub. The tokenizer is a word-level ChatML tokenizer (digits and
punctuation are single tokens), and the model is a randomly initialised `Qwen2ForCausalLM`, a real
architecture, so the trainer exercises exactly the code paths a real Qwen model would.

`tokenizer.py` holds the tokenizer and its vocabulary, `models.py` the model; both are re-exported here,
so `from sdpo_fast.testing import tiny_qwen2, tiny_tokenizer` is the one import users need.
"""

from __future__ import annotations

from .models import tiny_qwen2
from .tokenizer import BASE_WORDS, CHATML_TEMPLATE, PUNCTUATION, SPECIAL_TOKENS, tiny_tokenizer

__all__ = ["BASE_WORDS", "CHATML_TEMPLATE", "PUNCTUATION", "SPECIAL_TOKENS", "tiny_qwen2", "tiny_tokenizer"]
