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
MAILTO = "mailto:sam@sender.example?subject=unsubscribe-12-abcdefghijklmnopqrstuvwxyz"


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
    unsubscribe=st.sampled_from([(), (MAILTO,), (MAILTO, "https://acme.example/u?t=12-abc&e=p%40x.example")]),
)
@example(name="Sam", subject="s" * 69, body="", references=[], unsubscribe=())  # "Subject: " + 69 = 78: fits
@example(name="Sam", subject="s" * 70, body="", references=[], unsubscribe=())  # 79: folded by the library
@example(name="Sam", subject="Hi", body="From here on\n", references=[], unsubscribe=(MAILTO,))
@example(name="Zoë", subject="Hi", body="x", references=[], unsubscribe=(MAILTO,))
def test_the_direct_path_writes_what_the_library_writes(
    name: str, subject: str, body: str, references: list[str], unsubscribe: tuple[str, ...]
) -> None:
    out = outgoing(
        from_name=name,
        subject=subject,
        body=body,
        in_reply_to=references[-1] if references else None,
        references=tuple(references),
        unsubscribe=unsubscribe,
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


def test_every_message_says_how_to_unsubscribe() -> None:
    for body in ("Hi Pat\n", "Grüße\n"):  # the direct path and the library's
        one_click = "https://acme.example/u?t=12-abc"
        raw = compose.build_message(outgoing(body=body, unsubscribe=(MAILTO, one_click)))
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert " ".join(str(parsed["List-Unsubscribe"]).split()) == f"<{MAILTO}>, <{one_click}>"
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    mailto_only = email.message_from_bytes(compose.build_message(outgoing(unsubscribe=(MAILTO,))))
    assert mailto_only["List-Unsubscribe"] == f"<{MAILTO}>" and mailto_only["List-Unsubscribe-Post"] is None
