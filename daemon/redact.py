"""Secrets out of server text: every configured secret and its AUTH encodings become `***`.

A server may echo what it was sent (the AUTH PLAIN string, a password) in its
error text. Everything a server says passes through `redact()` before it is
logged, stored or printed; the log renderer applies it once more to every field.
"""

from __future__ import annotations

import base64
import re
import threading
from typing import Any

MASK = "***"
_MIN_LEN = 4  # a shorter secret cannot be masked without masking ordinary words (and log keys) too
_lock = threading.Lock()
_forms: set[str] = set()
_pattern: re.Pattern[str] | None = None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def encodings(username: str, secret: str) -> set[str]:
    """The secret as sent on the wire: itself, base64 of it, AUTH PLAIN, LOGIN, XOAUTH2 strings."""
    user, value = username.encode(), secret.encode()
    forms = {
        secret,
        _b64(value),
        _b64(b"\0" + user + b"\0" + value),
        _b64(user + b"\0" + user + b"\0" + value),
        _b64(b"user=" + user + b"\x01auth=Bearer " + value + b"\x01\x01"),
    }
    # base64 of the secret at each alignment inside a longer string: the stable middle of each encoding
    for shift in (1, 2):
        encoded = _b64(b"\0" * shift + value)
        middle = encoded[4:-4] if len(encoded) > 12 else ""
        if len(middle) >= 8:
            forms.add(middle)
    return {f for f in forms if len(f) >= _MIN_LEN}


def register(username: str, secret: str) -> None:
    """Remember a secret (and its encodings) so that no text shows it from now on."""
    global _pattern
    if len(secret) < _MIN_LEN:
        return  # nothing that short can be told from the text around it
    new = encodings(username, secret)
    with _lock:
        if new <= _forms:
            return
        _forms.update(new)
        _pattern = None  # made again, once, by the next redact()


def redact(text: str) -> str:
    global _pattern
    pattern = _pattern
    if not text or not _forms:
        return text
    if pattern is None:
        with _lock:
            pattern = _pattern = _pattern or re.compile(trie_pattern(_forms))
    return pattern.sub(MASK, text)


def trie_pattern(words: set[str]) -> str:
    """One regex for many literal words, shaped as their prefix tree: matching costs the length of a word,
    not the number of words (2,000 mailboxes' secrets are 14,000 forms). The longest word wins."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here
    return _branch(trie)


def _branch(node: dict[str, Any]) -> str:
    out = []
    while "" not in node and len(node) == 1:  # a run with no branch and no word's end: plain text
        ((ch, node),) = node.items()
        out.append(re.escape(ch))
    children = [re.escape(ch) + _branch(child) for ch, child in sorted(node.items()) if ch]
    if children:
        alternatives = children[0] if len(children) == 1 else "(?:" + "|".join(children) + ")"
        out.append(f"(?:{alternatives})?" if "" in node else alternatives)  # greedy: the longer word first
    return "".join(out)


def clean(text: str, limit: int = 300) -> str:
    """Server text made safe to keep: secrets masked, whitespace folded, bounded."""
    return " ".join(redact(text).split())[:limit]
