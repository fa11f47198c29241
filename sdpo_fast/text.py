"""Untrusted text made safe for a teacher prompt: valid Unicode, no invisible control characters.

Feedback is whatever a reward function or a program under test produced. Python strings may hold
things a tokenizer refuses (the Rust tokenizers raise an unrelated `TypeError` on a lone surrogate):

- lone surrogates, e.g. a program's output read with `errors="surrogateescape"` (undecodable bytes
  become U+DC80..U+DCFF) or a `"\\ud800"` escape it printed. A valid high/low pair is joined into
  its character; anything else becomes U+FFFD, the Unicode replacement character;
- `bytes`: decoded as UTF-8, invalid sequences as U+FFFD;
- C0/C1 control characters other than tab, newline and carriage return (NUL, ESC of colour codes,
  backspace, ...): written out as a visible `\\xNN` escape, so the teacher still reads that they were
  there, and no tokenizer or chat template sees a raw NUL.

`clean_text` is idempotent, and leaves ordinary text (tabs and newlines included) unchanged.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: str | bytes | bytearray) -> str:
    """`text` as valid Unicode without control characters (tab, newline and carriage return are kept)."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        raise TypeError(f"clean_text expects str or bytes, got {type(text).__name__}.")
    text = text[:]  # a plain str: a str subclass's overrides must not follow the text into the tokenizer
    if _SURROGATE.search(text):
        # UTF-16 with surrogatepass turns each surrogate back into its code unit: a decoder then joins valid
        # pairs and replaces the lone ones, which is exactly what a UTF-16 reader of this text would see.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", errors="replace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
