"""A randomly initialised `Qwen2ForCausalLM` whose special-token ids match the tiny tokenizer.

A real architecture, so the trainer exercises exactly the code paths a real Qwen model would.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from .tokenizer import tiny_tokenizer


def tiny_qwen2(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM whose special-token ids match `tokenizer`."""
    if tokenizer is None and vocab_size is None:
        tokenizer = tiny_tokenizer()
    vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        use_cache=True,
    )
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = None
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
    return model
