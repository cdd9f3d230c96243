"""The new text of a reply: a corpus of real client layouts (tests/unit/replies/), in several languages.

Each file is the text/plain part of a reply as the client writes it: Gmail (web, wrapped attribution, Android),
Apple Mail, iPhone, Outlook (desktop with and without its line, web, iOS), Thunderbird, in English, German,
French, Spanish, Dutch and Italian. `not-*` files are replies that must not read as an unsubscribe.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import replies
from daemon.imap import says_unsubscribe

CORPUS = Path(__file__).resolve().parent / "replies"
FILES = sorted(CORPUS.glob("*.txt"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_each_client_layout(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert replies.only_unsubscribe(text) is not path.stem.startswith("not-"), replies.new_text(text)


def test_the_corpus_covers_the_clients_and_languages() -> None:
    stems = {p.stem for p in FILES}
    clients = ("gmail-web", "gmail-android", "apple-mail", "iphone", "outlook-desktop", "outlook-web", "thunderbird")
    for client in clients:
        assert any(s.startswith(client) for s in stems), client
    assert {s.rsplit("-", 1)[1] for s in stems} >= {"en", "de", "fr", "es", "nl", "it"}
    assert sum(s.startswith("not-") for s in stems) >= 5


@pytest.mark.parametrize(
    ("text", "new"),
    [
        ("Unsubscribe\n\nSent from my iPhone\n\n> On Dec 5 wrote:\n> Hi", "Unsubscribe"),
        ("Sure, Tuesday works.\nTalk then\n\nOn Sat, Dec 5, 2026 at 6:57 AM A <a@b.example>\nwrote:\n> Hi", None),
        ("On Sat, Dec 5, 2026 at 6:57 AM A <a@b.example> wrote:\n> Unsubscribe", ""),
    ],
)
def test_new_text(text: str, new: str | None) -> None:
    expected = new if new is not None else "Sure, Tuesday works.\nTalk then"
    assert replies.new_text(text) == expected


def test_a_hostile_reply_is_read_only_so_far() -> None:
    """The parser's patterns backtrack on long lines: only MAX_TEXT characters, lines cut at MAX_LINE, are read.
    Unbounded, the attribution below costs over a minute of CPU (measured: 62 s for 60,000 characters)."""
    attribution = "On " + "x " * 100_000 + "wrote:"
    assert replies.new_text(attribution) == attribution[: replies.MAX_LINE]
    assert replies.only_unsubscribe("Unsubscribe\n\n> " + attribution) is True
    assert replies.only_unsubscribe(attribution + "\nUnsubscribe") is False
    assert replies.new_text("stop\n" * 100_000).count("\n") < replies.MAX_TEXT


def test_a_whole_reply_from_its_mime_parts() -> None:
    """The text/plain part of a multipart reply, decoded from quoted-printable in its charset."""
    body = (CORPUS / "outlook-desktop-de.txt").read_bytes()
    raw = (
        b"From: pat@initech.example\r\nTo: alice@acme.example\r\nSubject: AW: Kurze Frage\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + body
        + b"\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Abmelden</p>\r\n--b--\r\n"
    )
    assert says_unsubscribe(raw) is True
    assert says_unsubscribe(raw.replace(b"Abmelden\r\n\r\nVon:", b"Gerne!\r\n\r\nVon:")) is False
