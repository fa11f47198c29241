"""A word-level ChatML tokenizer built in code: digits and punctuation are single tokens, no model hub."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough words to write tasks, reprompt templates and feedback without <unk>.
BASE_WORDS = [
    "system",
    "user",
    "assistant",
    "<think>",
    "</think>",
    "what",
    "is",
    "the",
    "answer",
    "to",
    "of",
    "a",
    "an",
    "and",
    "or",
    "not",
    "no",
    "yes",
    "true",
    "false",
    "plus",
    "minus",
    "times",
    "divided",
    "by",
    "equals",
    "correct",
    "correctly",
    "solution",
    "solve",
    "original",
    "question",
    "following",
    "feedback",
    "from",
    "your",
    "unsuccessful",
    "earlier",
    "attempt",
    "expected",
    "got",
    "but",
    "wrong",
    "right",
    "test",
    "tests",
    "failed",
    "passed",
    "error",
    "output",
    "input",
    "return",
    "def",
    "print",
    "if",
    "else",
    "for",
    "in",
    "range",
    "while",
    "x",
    "y",
    "z",
    "n",
    "i",
    "j",
    "k",
    "value",
    "result",
    "sum",
    "list",
    "reverse",
    "string",
    "number",
    "you",
    "are",
    "helpful",
    "add",
    "subtract",
    "multiply",
    "compute",
    "write",
    "function",
    "python",
    "code",
    "count",
    "even",
    "odd",
    "please",
    "think",
    "step",
    "final",
    "hello",
    "world",
    "good",
    "bad",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "copy",
    "repeat",
    "say",
    "word",
    "words",
    "letter",
    "letters",
    "first",
    "last",
]
PUNCTUATION = list("0123456789+-*/=()[]{}<>:;.,!?'\"#_%&|^~@$\\`")


def tiny_tokenizer(
    vocab_size: int | None = None, extra_words: tuple[str, ...] | list[str] = ()
) -> PreTrainedTokenizerFast:
    """A word-level ChatML tokenizer.

    Args:
        vocab_size: pad the vocabulary with `<extra_i>` tokens up to this size (for benchmarks
            with a real vocabulary size such as Qwen's 151936). `None` keeps it minimal.
        extra_words: additional whole words to add to the vocabulary.
    """
    words: list[str] = []
    for w in [*SPECIAL_TOKENS, *BASE_WORDS, *extra_words, *PUNCTUATION]:
        if w not in words:
            words.append(w)
    if vocab_size is not None:
        if vocab_size < len(words):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(words)} base tokens.")
        words += [f"<extra_{i}>" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()  # "Correct solution" and "correct solution" share tokens
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        padding_side="left",
        truncation_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
