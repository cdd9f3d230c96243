"""Pure: the unsubscribe token of an enrollment, and finding one in an incoming mail (SPEC §11).

Every message carries `List-Unsubscribe: <mailto:MAILBOX?subject=unsubscribe-TOKEN>`.
The token is the enrollment's id and an HMAC of it under a key the database
keeps: it names the enrollment, cannot be guessed for another one, and needs
no table of its own. A mail that comes back with it (a mail client's
unsubscribe button sends exactly that) suppresses the address.
"""

from __future__ import annotations

import base64
import hmac
import re

PREFIX = "unsubscribe-"
_MAC_CHARS = 26  # 130 bits of the HMAC, base32
_FOUND = re.compile(rf"{PREFIX}(\d{{1,18}})-([a-z2-7]{{{_MAC_CHARS}}})", re.IGNORECASE)


def _mac(key: bytes, enrollment: int) -> str:
    digest = hmac.digest(key, f"enrollment:{enrollment}".encode(), "sha256")
    # 17 bytes are the 136 bits that the first 26 base32 characters encode: the same token, half the encoding.
    return base64.b32encode(digest[:17]).decode("ascii").lower()[:_MAC_CHARS]


def token(key: bytes, enrollment: int) -> str:
    return f"{enrollment}-{_mac(key, enrollment)}"


def mailto(mailbox: str, key: bytes, enrollment: int) -> str:
    return f"mailto:{mailbox}?subject={PREFIX}{token(key, enrollment)}"


def found(key: bytes, text: str) -> int | None:
    """The enrollment whose genuine token `text` (a subject, at most its first 1,000 characters) carries."""
    for match in _FOUND.finditer(text[:1000]):
        enrollment = int(match.group(1))
        if hmac.compare_digest(match.group(2).lower(), _mac(key, enrollment)):
            return enrollment
    return None
