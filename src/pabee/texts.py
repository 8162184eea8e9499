"""What makes a string a text the tokenizers can take, checked before a batch is formed.

A Python string (and a JSON string: `"\\ud800"` is a legal escape) can hold a *lone surrogate*, a code point in
U+D800-U+DFFF without its partner. It is not Unicode text: UTF-8 cannot encode it, and the fast (Rust) tokenizers
raise `TypeError` on it for the whole call, so one such text would fail every text batched with it. Every other
code point (NUL, U+FFFE, private use, unassigned) tokenizes, at worst to `[UNK]`.

Reading a file with `errors="surrogateescape"` turns each byte that is not UTF-8 into U+DC80-U+DCFF, so the same
check names a line holding such bytes instead of the reader failing the whole file.
"""

from __future__ import annotations

import re

__all__ = ["example_problem", "replace_surrogates", "text_problem"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why a tokenizer cannot take `text` (one line, naming the character), or None when it can."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    point, where = ord(found.group()), found.start()
    if 0xDC80 <= point <= 0xDCFF:  # what surrogateescape makes of a byte (or a lone \udc80-\udcff escape)
        return (
            f"character {where} is not valid UTF-8 text (byte 0x{point - 0xDC00:02X}, or a lone surrogate "
            f"U+{point:04X})"
        )
    return f"character {where} is a lone surrogate U+{point:04X}, which is not valid Unicode text"


def example_problem(text: str, text_pair: str | None = None) -> str | None:
    """`text_problem` of a text or of a pair's parts, saying which part."""
    for part, value in (("text", text), ("text_pair", text_pair)):
        if value is not None and (problem := text_problem(value)):
            return problem if text_pair is None else f"{part}: {problem}"
    return None


def replace_surrogates(text: str) -> str:
    """`text` with each lone surrogate as U+FFFD, for a store that takes only UTF-8 (say, Parquet)."""
    return _SURROGATE.sub("\ufffd", text)
