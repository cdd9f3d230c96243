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
_forms: set[str] = set()  # configured secrets: kept for the life of the process
_rotating: dict[str, set[str]] = {}  # key → forms of its current secret (an access token replaced hourly)
_recent: set[str] = set()  # rotating forms added since `_pattern` was built
_pattern: re.Pattern[str] | None = None  # _forms and the rotating forms as they were when it was built
_recent_pattern: re.Pattern[str] | None = None
REBUILD_AT = 2000  # recent forms (~280 token refreshes) before the whole pattern is built again without old ones


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


def register_rotating(key: str, username: str, secret: str) -> None:
    """A secret that replaces the previous one under `key` (an access token): both masked until the pattern is
    next built whole, then only the current one. Building the whole pattern costs its size (2,000 mailboxes'
    forms take a second), so tokens refreshed meanwhile go to a small pattern of their own."""
    global _pattern, _recent_pattern
    if len(secret) < _MIN_LEN:
        return
    new = encodings(username, secret)
    with _lock:
        if _rotating.get(key) == new:
            return
        _rotating[key] = new
        _recent.update(new)
        _recent_pattern = None
        if len(_recent) > REBUILD_AT:
            _recent.clear()
            _pattern = None


def forget(key: str) -> None:
    """A rotating secret no longer in use (its mailbox left the config): gone at the next whole build."""
    with _lock:
        _rotating.pop(key, None)


def active() -> bool:
    """Is there a secret to mask at all?"""
    return bool(_forms or _rotating)


def redact(text: str) -> str:
    global _pattern, _recent_pattern
    pattern, recent = _pattern, _recent_pattern
    if not text or not active():
        return text
    if pattern is None:
        with _lock:
            if _pattern is None:
                _recent.clear()
                _pattern = re.compile(trie_pattern(_forms.union(*_rotating.values())))
            pattern = _pattern
    if recent is None and _recent:
        with _lock:
            if _recent_pattern is None and _recent:
                _recent_pattern = re.compile(trie_pattern(_recent))
            recent = _recent_pattern
    text = pattern.sub(MASK, text)
    return recent.sub(MASK, text) if recent is not None else text


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
