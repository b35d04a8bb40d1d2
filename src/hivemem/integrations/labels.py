"""Reversible encodings of a framework's names into hivemem namespace segments and keys.

A namespace segment holds letters, digits and ``_ - . : @ +`` and may not start with
``_`` (reserved); a key may hold anything but ``/`` and control characters. Frameworks
allow more (LangGraph labels are any non-empty string without ``.``; its keys any
string), so each character outside the safe set, and ``+`` itself, is written as ``+``
and two upper-case hex digits per UTF-8 byte (``a/b`` → ``a+2Fb``). The encoding is
injective, so distinct names never share a segment, and decoding is exact.
"""

from __future__ import annotations

import re

#: Characters a label keeps as they are (``+`` is the escape, ``.`` is kept out so a
#: segment is never ``.`` or ``..``).
_LABEL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-:@")
_ESCAPED = re.compile(r"\+([0-9A-F]{2})")


def _escape(ch: str) -> str:
    return "".join(f"+{b:02X}" for b in ch.encode("utf-8"))


def encode_label(label: str) -> str:
    """One namespace segment for ``label`` (non-empty). A leading ``_`` is escaped."""
    out = [c if c in _LABEL_SAFE else _escape(c) for c in label]
    if out and out[0] == "_":
        out[0] = "+5F"
    return "".join(out)


def encode_key(key: str) -> str:
    """An item key for ``key``: ``/``, ``+`` and control characters escaped; ``""`` → ``+``."""
    if key == "":
        return "+"
    return "".join(_escape(c) if c in "/+" or ord(c) < 0x20 or ord(c) == 0x7F else c for c in key)


def encode_part(name: str) -> str:
    """:func:`encode_key` with ``.`` escaped too, for a part of a key whose parts are
    joined by ``.`` (so ``("a.b", "c")`` and ``("a", "b.c")`` never meet)."""
    return encode_key(name).replace(".", "+2E")


def decode(text: str) -> str:
    """The name :func:`encode_label` or :func:`encode_key` was given."""
    if text == "+":
        return ""
    if "+" not in text:
        return text
    raw = bytearray()
    i = 0
    while i < len(text):
        m = _ESCAPED.match(text, i)
        if m:
            raw.append(int(m.group(1), 16))
            i = m.end()
        else:
            raw.extend(text[i].encode("utf-8"))
            i += 1
    return raw.decode("utf-8")
