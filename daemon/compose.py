"""Pure: templates and prospect data → email messages with thread headers."""

from __future__ import annotations

import email.policy
import email.utils
import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment
from markdown_it import MarkdownIt

STANDARD_FIELDS = ("email", "first_name", "last_name", "company")
SENDER_FIELDS = ("sender_name", "sender_address", "signature")  # the mailbox's, not the prospect's
SPIN_SEED = "spin_seed"  # the variable `spin` chooses by: the enrollment and step (a retry renders the same)
_DEFAULT_FILTERS = frozenset({"default", "d"})
_POLICY = email.policy.compat32.clone(linesep="\r\n")
_ASCII = Charset("us-ascii")
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP

MAX_REPEAT = 100_000  # characters or items made by `*` on a string or list
MAX_POWER_BITS = 4096  # `**` beyond this is refused: a template must not hang or exhaust the daemon


class _Sandbox(SandboxedEnvironment):
    """The sandbox, with `**` bounded (an unbounded power is a denial of service at render or compile time)."""

    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right < 0 or right * max(abs(left), 1).bit_length() > MAX_POWER_BITS:
                raise jinja2.exceptions.SecurityError(f"{left} ** {right} is too large for a template")
        if operator == "*" and isinstance(left, str | list | tuple) != isinstance(right, str | list | tuple):
            count, seq = (right, left) if isinstance(left, str | list | tuple) else (left, right)
            if isinstance(count, int) and count * max(len(seq), 1) > MAX_REPEAT:
                raise jinja2.exceptions.SecurityError("a repeated string or list that large is refused in a template")
        return super().call_binop(context, operator, left, right)


_ENV = _Sandbox(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)


@jinja2.pass_context
def spin(context: Any, choices: Any) -> str:
    """`{{ spin("Hi|Hello|Hey") }}`: one of the choices, the same for an enrollment's step every time it is
    rendered (a retry, a preview), spread over the enrollments."""
    if not isinstance(choices, str):
        raise TemplateProblem("spin() takes one string of choices separated by |")
    options = choices.split("|")
    seed = str(context.get(SPIN_SEED, ""))
    digest = hashlib.sha256(f"{seed}\0{choices}".encode()).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


_ENV.globals["spin"] = spin


class TemplateProblem(Exception):
    """A template failed to compile or render; the message says why, without data values."""


@dataclass(frozen=True, slots=True, eq=False)
class Template:
    """A compiled template with the prospect fields it cannot render without."""

    source: str
    compiled: jinja2.Template
    required: frozenset[str]
    names: frozenset[str] = frozenset()  # every name it reads, guarded by `default` or not

    def render(self, variables: Mapping[str, Any]) -> str:
        try:
            return self.compiled.render(variables)
        except jinja2.UndefinedError as exc:
            raise TemplateProblem(f"undefined variable: {exc.message}") from None
        except jinja2.TemplateError as exc:
            raise TemplateProblem(str(exc)) from None
        except Exception as exc:  # a template may divide by zero, index past the end...
            raise TemplateProblem(f"{type(exc).__name__}: {str(exc)[:200]}") from None


def compile_template(source: str) -> Template:
    """Compile `source`; raise TemplateProblem with the line on a syntax error."""
    try:
        tree = _ENV.parse(source)
        compiled = _ENV.from_string(tree)
        # Jinja keeps a template's globals as a ChainMap over the environment's, and every render copies it
        # key by key: flattened once here, a render costs a quarter (measured, bench/throughput.py).
        compiled.globals = dict(compiled.globals)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}") from None
    except Exception as exc:  # the compiler folds constants: an expression can fail here too
        raise TemplateProblem(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return Template(source, compiled, frozenset(_required_names(tree)), frozenset(_read_names(tree)))


def _read_names(tree: nodes.Template) -> set[str]:
    """Every variable the template reads (not those it sets itself, nor the functions it is given)."""
    assigned = {n.name for n in tree.find_all(nodes.Name) if n.ctx in {"store", "param"}} | set(_ENV.globals)
    return {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load" and n.name not in assigned}


def _required_names(tree: nodes.Template) -> set[str]:
    """Names the template reads without a `default` filter or an `is defined` test.

    A cheap pre-check for enrollment: a row lacking one of these is rendered for
    real to confirm, so a name used only inside `{% if name %}` costs a render,
    never a wrong rejection.
    """
    guarded: set[int] = set()
    for flt in tree.find_all(nodes.Filter):
        if flt.name in _DEFAULT_FILTERS and isinstance(flt.node, nodes.Name):
            guarded.add(id(flt.node))
    for test in tree.find_all(nodes.Test):
        if test.name in {"defined", "undefined"} and isinstance(test.node, nodes.Name):
            guarded.add(id(test.node))
    return {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load" and id(n) not in guarded} & _read_names(tree)


SAMPLE_UNSUBSCRIBE = "mailto:sender@example.com?subject=unsubscribe-1-sample"


def prospect_variables(
    fields: Mapping[str, str],
    sender_name: str,
    sender_address: str,
    unsubscribe_url: str = SAMPLE_UNSUBSCRIBE,
    signature: str = "",
    seed: str = "",
) -> dict[str, str]:
    """Template variables of one prospect: its non-empty fields, the sender's (its name, address and rendered
    signature), its unsubscribe link, and what `spin` chooses by (`seed`: the enrollment and step)."""
    variables = {k: v for k, v in fields.items() if v != ""}
    variables["sender_name"] = sender_name
    variables["sender_address"] = sender_address
    variables["signature"] = signature
    variables["unsubscribe_url"] = unsubscribe_url
    variables[SPIN_SEED] = seed
    return variables


def sender_variables(name: str, address: str) -> dict[str, str]:
    """What a mailbox's signature is rendered with."""
    return {"sender_name": name, "sender_address": address}


def sample_variables(extra_fields: tuple[str, ...]) -> dict[str, str]:
    """The sample prospect `check` renders every step against."""
    sample = {
        "email": "pat.sample@example.com",
        "first_name": "Pat",
        "last_name": "Sample",
        "company": "Example Corp",
    }
    for name in extra_fields:
        sample.setdefault(name, f"sample {name}")
    return prospect_variables(sample, "Sam Sender", "sam@sender.example", signature="Sam Sender\nsam@sender.example")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What compose needs to know about one message to send."""

    from_name: str
    from_address: str
    to_address: str
    subject: str
    body: str
    message_id: str
    date: float
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()  # List-Unsubscribe URIs: the mailto, then an https one-click link if any
    html: str | None = None  # format = "markdown": the HTML part beside the text (multipart/alternative)


OUR_MESSAGE_ID = re.compile(r"<cadenced\.\d+\.\d+\.[0-9a-f]+@[^>\s]+>")  # what make_message_id makes


_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>&~])")


def markdown_safe(value: str) -> str:
    """A prospect's field as Markdown reads it literally: its punctuation escaped (no link, no emphasis)."""
    return _MD_SPECIAL.sub(r"\\\1", value)


_RULE_LINE = re.compile(r"\s*([-=_*])(\s*\1)*\s*")  # a line Markdown reads as a heading's underline or a rule


def markdown_signature(text: str) -> str:
    """A rendered signature as a Markdown body's `{{ signature }}`: its lines kept as lines (hard breaks), and the
    usual `-- ` delimiter (any line of dashes or equals signs) written literally, not read as the underline that
    makes the line above it a heading."""
    lines = [("\\" + line) if _RULE_LINE.fullmatch(line) and line.strip() else line for line in text.split("\n")]
    ends = [bool(a.strip() and b.strip()) for a, b in zip(lines, [*lines[1:], ""], strict=True)]
    return "\n".join(line + ("\\" if hard else "") for line, hard in zip(lines, ends, strict=True))


def markdown_html(source: str) -> str:
    """The HTML part of a `format = "markdown"` body: CommonMark, raw HTML in it escaped (not passed through),
    no tracking pixel, links as written."""
    inner = _MARKDOWN.render(source)
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n{inner}</body></html>\n'


def make_message_id(outbox_id: int, attempt_token: str, sender_address: str) -> str:
    """A Message-ID on the sender's domain, unique per outbox row."""
    domain = sender_address.rpartition("@")[2] or "localhost"
    return f"<cadenced.{outbox_id}.{attempt_token}@{domain}>"


def thread_subject(first_subject: str, own_subject: str | None) -> str:
    """A follow-up without its own subject goes as a reply in the thread."""
    if own_subject:
        return own_subject
    if first_subject.lower().startswith("re:"):
        return first_subject
    return f"Re: {first_subject}"


def build_message(out: Outgoing) -> bytes:
    """The RFC 5322 message for one send, CRLF line ends, ready for DATA.

    Most messages are plain: ASCII headers that fit on a line and an ASCII
    body. Those are written out directly, byte for byte what the standard
    library makes of them (a property test holds the two equal); anything
    else (a header to fold or encode, UTF-8, a line starting with "From ")
    goes through the library. Measured, the library's header folding was a
    quarter of the daemon's CPU per message.
    """
    return (_plain_message(out) if out.html is None else None) or library_message(out)


def _unsubscribe_headers(out: Outgoing) -> bytes:
    """List-Unsubscribe (RFC 2369), one URI a line, and RFC 8058's one-click POST when an https link is given.
    Written as is on both paths: the URIs are plain ASCII without spaces (made so by the caller)."""
    if not out.unsubscribe:
        return b""
    lines = "List-Unsubscribe: " + ",\r\n ".join(f"<{uri}>" for uri in out.unsubscribe) + "\r\n"
    if any(uri.startswith("https://") for uri in out.unsubscribe):
        lines += "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    return lines.encode("ascii")


def library_message(out: Outgoing) -> bytes:
    """The message through the standard library's compat32 API.

    compat32 on purpose: the same message through EmailMessage's header
    registry costs seven times as much.
    """
    msg: Message = Message() if out.html is None else MIMEMultipart("alternative")
    msg["From"] = email.utils.formataddr((out.from_name, out.from_address), charset="utf-8")
    msg["To"] = out.to_address
    msg["Subject"] = out.subject if out.subject.isascii() else Header(out.subject, "utf-8").encode()
    msg["Date"] = email.utils.formatdate(out.date, usegmt=True)
    msg["Message-ID"] = out.message_id
    if out.in_reply_to:
        msg["In-Reply-To"] = out.in_reply_to
    if out.references:
        msg["References"] = " ".join(out.references)
    plain = out.body.isascii() and all(len(line) <= 998 for line in out.body.splitlines())
    if out.html is None:
        msg["MIME-Version"] = "1.0"
        msg.set_payload(out.body, _ASCII if plain else _UTF8)
    else:  # MIMEMultipart wrote its MIME-Version and Content-Type first: moved after ours, as in a plain message
        del msg["MIME-Version"]
        content_type = msg["Content-Type"]
        del msg["Content-Type"]
        msg["MIME-Version"] = "1.0"
        msg["Content-Type"] = content_type
        for text, subtype in ((out.body, "plain"), (out.html, "html")):
            part = MIMEText("", subtype, "us-ascii")
            del part["MIME-Version"]
            ascii_ok = text.isascii() and all(len(line) <= 998 for line in text.splitlines())
            part.set_payload(text, _ASCII if ascii_ok else _UTF8)
            msg.attach(part)
    written = msg.as_bytes(policy=_POLICY)
    if not out.unsubscribe:
        return written
    # After References, as the direct writer puts them (the subject is one line: this is the header's own).
    return written.replace(
        b"\r\nMIME-Version: 1.0\r\n", b"\r\n" + _unsubscribe_headers(out) + b"MIME-Version: 1.0\r\n", 1
    )


_HEADER_LINE = 78  # compat32's max_line_length: a longer header is folded
_PLAIN_VALUE = re.compile(r"[!-~]+(?: [!-~]+)*")  # printable ASCII, single spaces inside: nothing to fold
_NEEDS_LIBRARY = re.compile(r"(?:^|[\r\n])From |[^\t\n\r -~]|[^\r\n]{999}")  # mangled, 8-bit or control, too long
_LINE_ENDS = re.compile(r"\r\n|\r|\n")
_BODY_HEADERS = (
    b'MIME-Version: 1.0\r\nContent-Type: text/plain; charset="us-ascii"\r\nContent-Transfer-Encoding: 7bit\r\n\r\n'
)


@functools.lru_cache(maxsize=4096)
def _address_header(name: str, address: str) -> str:
    """From of a mailbox: the same for every message it sends."""
    return email.utils.formataddr((name, address))


@functools.lru_cache(maxsize=4)
def _date_header(second: int) -> str:
    """Date: whole seconds, the same for every message sent within one."""
    return email.utils.formatdate(second, usegmt=True)


def _plain_message(out: Outgoing) -> bytes | None:
    """`library_message(out)` when it would write every header as given; else None."""
    headers = [
        ("From", _address_header(out.from_name, out.from_address)),
        ("To", out.to_address),
        ("Subject", out.subject),
        ("Date", _date_header(int(out.date))),
        ("Message-ID", out.message_id),
    ]
    if out.in_reply_to:
        headers.append(("In-Reply-To", out.in_reply_to))
    if out.references:
        headers.append(("References", " ".join(out.references)))
    lines = []
    for name, value in headers:
        if len(name) + len(value) + 2 > _HEADER_LINE or not _PLAIN_VALUE.fullmatch(value):
            return None
        lines.append(f"{name}: {value}\r\n")
    if _NEEDS_LIBRARY.search(out.body):
        return None
    head = "".join(lines).encode("ascii") + _unsubscribe_headers(out)
    return head + _BODY_HEADERS + _LINE_ENDS.sub("\r\n", out.body).encode("ascii")
