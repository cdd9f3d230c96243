"""The message writer: the direct path for plain messages is byte for byte the standard library's."""

from __future__ import annotations

import email
import email.policy

from hypothesis import example, given, settings
from hypothesis import strategies as st

from daemon import compose

# Text that reaches both paths: plain words, spaces in runs, tabs, line ends of every kind,
# "From " at a line start, 8-bit and control characters, and lengths around the 78 limit.
_WORDS = st.sampled_from(
    ["Hello", "From", "From ", "a", " ", "  ", "\t", "\n", "\r\n", "\r", "é", "\x0b", ";", '"', "x" * 40]
)
TEXT = st.lists(_WORDS, max_size=12).map("".join) | st.text(max_size=120)
BODY = TEXT | st.integers(0, 1100).map(lambda n: "y" * n + "\n")


def outgoing(**kw: object) -> compose.Outgoing:
    base: dict[str, object] = {
        "from_name": "Sam Sender",
        "from_address": "sam@sender.example",
        "to_address": "pat@prospect.example",
        "subject": "Hello Example Corp",
        "body": "Hi Pat,\n\nA short note.\n",
        "message_id": "<cadenced.1.1.abcd1234@sender.example>",
        "date": 1_790_000_000.0,
    }
    base.update(kw)
    return compose.Outgoing(**base)  # type: ignore[arg-type]


@settings(max_examples=600, deadline=None)
@given(
    name=TEXT,
    subject=TEXT,
    body=BODY,
    references=st.lists(st.sampled_from(["<a@b>", "<cadenced.2.1.ff@x>"]), max_size=8),
)
@example(name="Sam", subject="s" * 69, body="", references=[])  # "Subject: " + 69 = 78: fits
@example(name="Sam", subject="s" * 70, body="", references=[])  # 79: folded by the library
@example(name="Sam", subject="Hi", body="From here on\n", references=[])
@example(name="Zoë", subject="Hi", body="x", references=[])
def test_the_direct_path_writes_what_the_library_writes(
    name: str, subject: str, body: str, references: list[str]
) -> None:
    out = outgoing(
        from_name=name,
        subject=subject,
        body=body,
        in_reply_to=references[-1] if references else None,
        references=tuple(references),
    )
    assert compose.build_message(out) == compose.library_message(out)


def test_a_plain_message_takes_the_direct_path_and_parses_back() -> None:
    out = outgoing(in_reply_to="<a@b>", references=("<a@b>",))
    assert compose._plain_message(out) is not None  # the everyday message does not pay for the library
    parsed = email.message_from_bytes(compose.build_message(out), policy=email.policy.default)
    assert parsed["From"] == "Sam Sender <sam@sender.example>"
    assert parsed["References"] == "<a@b>"
    assert parsed.get_content() == "Hi Pat,\r\n\r\nA short note.\r\n"


def test_what_needs_the_library_goes_to_it() -> None:
    for out in (
        outgoing(subject="Grüße"),
        outgoing(subject="word " * 20),
        outgoing(body="From the desk of\n"),
        outgoing(body="z" * 999),
        outgoing(from_name="Sam, Sales"),  # quoted by formataddr: still direct, and still equal
    ):
        assert compose.build_message(out) == compose.library_message(out)
    assert compose._plain_message(outgoing(subject="Grüße")) is None
    assert compose._plain_message(outgoing(body="From the desk of\n")) is None
