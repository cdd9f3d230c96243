"""One SMTP transaction on the wire, against a scripted server that answers as servers do, and as they should not.

The server here is a real TCP server on loopback: it reads what the client
writes and answers by a script, in one packet or a byte at a time. Each case
runs with PIPELINING offered (MAIL, RCPT and DATA in one write) and without
(one command per round trip): the outcome must not depend on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from daemon import smtp
from daemon.config import load_config
from daemon.errors import AddressRejected, LeaseExpired, MailboxDown, MailboxRefused, Uncertain
from tests.conftest import Project

pytestmark = pytest.mark.anyio

MESSAGE = b"Subject: hi\r\n\r\nline one\r\n.starts with a dot\r\n"


@dataclass
class Scripted:
    """Answers each command by `answer(command)`; `trickle` sends replies a byte at a time."""

    answer: Callable[[str], str | None]
    pipelining: bool
    trickle: bool = False
    commands: list[str] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(text: str) -> None:
            data = text.encode() + b"\r\n"
            for chunk in [data[i : i + 1] for i in range(len(data))] if self.trickle else [data]:
                writer.write(chunk)
                await writer.drain()

        await say("220 scripted ESMTP")
        pending: list[str] = []  # replies held back while the client's commands keep coming (one packet)
        try:
            while line := await reader.readline():
                command = line.decode().rstrip("\r\n")
                self.commands.append(command)
                verb = command.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    extensions = ["250-scripted", *(["250-PIPELINING"] if self.pipelining else []), "250 8BITMIME"]
                    await say("\r\n".join(extensions))
                    continue
                reply = self.answer(command)
                if reply is None:  # hang up here
                    writer.close()
                    return
                if reply == "":  # say nothing more, until the client gives up
                    await reader.read()
                    return
                pending.append(reply)
                if verb == "DATA" and reply.startswith("354"):
                    await say("\r\n".join(pending))
                    pending.clear()
                    content = b""
                    while not content.endswith(b"\r\n.\r\n") and content != b".\r\n":
                        content += await reader.readuntil(b"\r\n")
                    self.contents.append(content)
                    end = self.answer("<end of data>")
                    if end is None:
                        writer.close()
                        return
                    if end == "":
                        await reader.read()
                        return
                    await say(end)
                elif not reader._buffer:  # type: ignore[attr-defined]  # nothing more pipelined: answer now
                    await say("\r\n".join(pending))
                    pending.clear()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def normal(command: str) -> str | None:
    verb = command.split(" ", 1)[0].upper()
    return {"DATA": "354 go ahead", "QUIT": "221 bye"}.get(verb, "250 2.0.0 OK queued as 1")


@asynccontextmanager
async def connection(project: Project, script: Scripted, limit: str = "5s") -> AsyncIterator[smtp.Connection]:
    server = await asyncio.start_server(script.session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    project.add_mailboxes(1, smtp={"host": "127.0.0.1", "port": port, "security": "none", "timeout": limit})
    project.add_cadence()
    project.write()
    conn = smtp.Connection(load_config(project.config_path).mailboxes[0])
    try:
        yield conn
    finally:
        await conn.close()
        server.close()


@pytest.fixture(params=[True, False], ids=["pipelined", "stepwise"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.parametrize("trickle", [False, True], ids=["one-packet", "byte-by-byte"])
async def test_a_message_goes_whole_and_dot_stuffed(project: Project, pipelining: bool, trickle: bool) -> None:
    script = Scripted(normal, pipelining, trickle)
    async with connection(project, script) as conn:
        for n in range(2):
            accepted = await conn.send(MESSAGE, "mb0@example.com", f"p{n}@prospects.example")
            assert (accepted.code, accepted.text) == (250, "2.0.0 OK queued as 1")
    assert script.contents == [b"Subject: hi\r\n\r\nline one\r\n..starts with a dot\r\n.\r\n"] * 2
    verbs = [c.split(" ", 1)[0] for c in script.commands]
    assert verbs == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 2 + ["QUIT"]


async def test_a_refused_recipient_with_a_354_anyway_sends_nothing(project: Project, pipelining: bool) -> None:
    """A server that answers DATA with 354 though it refused the only recipient gets an empty message, then RSET."""

    refused: list[bool] = []

    def answer(command: str) -> str | None:
        if command.startswith("MAIL"):
            refused.clear()
        if command.startswith("RCPT") and "gone" in command:
            refused.append(True)
            return "550 5.1.1 <gone@prospects.example>: Recipient address rejected: User unknown"
        if command == "<end of data>" and refused:
            return "554 5.5.1 Error: no valid recipients"
        return normal(command)

    script = Scripted(answer, pipelining)
    async with connection(project, script) as conn:
        with pytest.raises(AddressRejected) as rejected:
            await conn.send(MESSAGE, "mb0@example.com", "gone@prospects.example")
        assert (rejected.value.stage, rejected.value.code) == ("rcpt", 550)
        accepted = await conn.send(MESSAGE, "mb0@example.com", "here@prospects.example")  # same connection
        assert accepted.code == 250
    assert script.contents[-1].endswith(b"..starts with a dot\r\n.\r\n")  # only the good one has content
    assert all(c == b".\r\n" for c in script.contents[:-1])
    assert "RSET" in script.commands


async def test_a_sender_refusal_is_the_mailboxes(project: Project, pipelining: bool) -> None:
    def answer(command: str) -> str | None:
        if command.startswith("MAIL"):
            return "553 5.7.1 <mb0@example.com>: Sender address rejected: not owned by user"
        if command.startswith(("RCPT", "DATA")):
            return "503 5.5.1 Error: need MAIL command"
        return normal(command)

    script = Scripted(answer, pipelining)
    async with connection(project, script) as conn:
        with pytest.raises(MailboxRefused) as refused:
            await conn.send(MESSAGE, "mb0@example.com", "p@prospects.example")
    assert refused.value.stage == "mail"
    assert script.contents == []


@pytest.mark.parametrize(
    ("reply", "trickle"),
    [
        ("25O not a code", False),
        ("250" + "x" * 9000, False),
        ("\r\n".join(["250-more"] * 5000), False),
        ("\r\n".join(["250-m"] * 7000), True),  # 42 KB a byte at a time: each line is parsed once, then refused
    ],
    ids=["malformed", "endless-line", "endless-reply", "endless-reply-trickled"],
)
async def test_a_reply_that_is_no_reply_is_a_lost_session(
    project: Project, pipelining: bool, reply: str, trickle: bool
) -> None:
    def answer(command: str) -> str | None:
        return reply if command.startswith("MAIL") else normal(command)

    async with connection(project, Scripted(answer, pipelining, trickle)) as conn:
        with pytest.raises(MailboxDown) as lost:
            await conn.send(MESSAGE, "mb0@example.com", "p@prospects.example")
        assert lost.value.code is None and lost.value.stage == "mail"
        assert not conn.is_open


@pytest.mark.parametrize("where", ["RCPT", "<end of data>"])
async def test_a_hang_up_before_the_content_is_safe_and_after_it_uncertain(
    project: Project, pipelining: bool, where: str
) -> None:
    def answer(command: str) -> str | None:
        return None if command.startswith(where) else normal(command)

    async with connection(project, Scripted(answer, pipelining)) as conn:
        with pytest.raises(MailboxDown if where == "RCPT" else Uncertain) as lost:
            await conn.send(MESSAGE, "mb0@example.com", "p@prospects.example")
    assert lost.value.code is None
    # Pipelined, the server may hang up before answering MAIL: either way, before the content.
    assert lost.value.stage in (("mail", "rcpt") if where == "RCPT" else ("end",))


@pytest.mark.parametrize("where", ["MAIL", "<end of data>"])
async def test_a_silent_server_times_out_at_the_stage_it_went_silent(
    project: Project, pipelining: bool, where: str
) -> None:
    def answer(command: str) -> str | None:
        return "" if command.startswith(where) else normal(command)

    async with connection(project, Scripted(answer, pipelining), limit="1s") as conn:
        with pytest.raises(MailboxDown if where == "MAIL" else Uncertain) as lost:
            await conn.send(MESSAGE, "mb0@example.com", "p@prospects.example")
        assert not conn.is_open
    assert lost.value.code is None and "timed out" in lost.value.text
    assert lost.value.stage == ("mail" if where == "MAIL" else "end")


async def test_a_lease_run_out_before_the_end_of_data_delivers_nothing(project: Project, pipelining: bool) -> None:
    """PostgreSQL's fence on the wire: asked just before the content leaves, a lease that ran out (by the
    daemon's own clock) drops the connection with no final dot; the server has nothing to deliver. The next
    transaction, with the lease renewed, goes on a fresh connection."""
    asked: list[bool] = []

    def still_ours(answer: bool) -> Callable[[], bool]:
        def ask() -> bool:
            asked.append(answer)
            return answer

        return ask

    script = Scripted(normal, pipelining)
    async with connection(project, script) as conn:
        with pytest.raises(LeaseExpired):
            await conn.send(MESSAGE, "mb0@example.com", "p0@prospects.example", still_ours(False))
        assert not conn.is_open and script.contents == []  # no content, no dot: nothing to deliver
        accepted = await conn.send(MESSAGE, "mb0@example.com", "p1@prospects.example", still_ours(True))
        assert accepted.code == 250 and len(script.contents) == 1
    assert asked == [False, True]  # asked once per transaction, at the end of DATA
