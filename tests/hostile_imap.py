"""A tiny IMAP server that misbehaves on purpose, one way per connection, in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from tests.servers import free_port

SCENARIOS = ("huge_uidvalidity", "huge_search", "huge_literal", "endless_line", "normal")


@dataclass
class HostileImap:
    scenarios: tuple[str, ...] = SCENARIOS
    port: int = field(default_factory=free_port)
    seen: list[str] = field(default_factory=list)  # the scenario of each connection, in order
    selected: list[str] = field(default_factory=list)  # every SELECT argument, as sent
    streamed: int = 0  # bytes of the huge literal and the endless line that the client took
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> HostileImap:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the hostile IMAP server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        scenario = self.scenarios[len(self.seen) % len(self.scenarios)]
        self.seen.append(scenario)
        try:
            writer.write(b"* OK hostile IMAP ready\r\n")
            while line := await asyncio.wait_for(reader.readline(), 120):
                if not await self._answer(scenario, line.decode("utf-8", "replace").rstrip("\r\n"), reader, writer):
                    break
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, chunk: bytes, limit: int) -> None:
        """Bytes until the client gives up (or `limit`): the client must not hold them all."""
        sent = 0
        while sent < limit:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            self.streamed += len(chunk)

    async def _answer(self, scenario: str, line: str, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        tag, _, rest = line.partition(" ")
        command, _, args = rest.partition(" ")
        command = command.upper()
        if command == "UID":
            command, _, args = args.partition(" ")
            command = "UID " + command.upper()
        if command == "CAPABILITY":
            w.write(f"* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK done\r\n".encode())
        elif command in ("LOGIN", "NOOP"):
            w.write(f"{tag} OK done\r\n".encode())
        elif command == "LIST":
            w.write(
                b'* LIST (\\HasNoChildren) "/" INBOX\r\n* LIST (\\HasNoChildren \\Sent) "/" "Sent Items"\r\n'
                + f"{tag} OK LIST done\r\n".encode()
            )
        elif command == "SELECT":
            self.selected.append(args)
            if scenario == "huge_uidvalidity":
                w.write(f"* OK [UIDVALIDITY 99999999999999999999] ok\r\n{tag} OK [READ-WRITE] done\r\n".encode())
            elif scenario == "endless_line":
                w.write(b"* OK [ALERT] ")
                await self._stream(w, b"x" * 65536, 256 * 1024 * 1024)
                return False
            else:
                w.write(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 4] ok\r\n")
                w.write(f"{tag} OK [READ-WRITE] done\r\n".encode())
        elif command == "UID SEARCH":
            if scenario == "huge_search":
                w.write(f"* SEARCH 18446744073709551616\r\n{tag} OK done\r\n".encode())
            elif scenario == "huge_literal":
                w.write(f"* SEARCH 5\r\n{tag} OK done\r\n".encode())
            elif "HEADER" in args.upper():
                w.write(f"* SEARCH 3\r\n{tag} OK done\r\n".encode())  # "found in Sent Items"
            else:
                w.write(f"* SEARCH\r\n{tag} OK done\r\n".encode())
        elif command == "UID FETCH":
            w.write(b"* 1 FETCH (UID 5 BODY[HEADER]<0> {10000000000}\r\n")
            await self._stream(w, b"y" * 65536, 256 * 1024 * 1024)
            return False
        elif command == "IDLE":
            w.write(b"+ idling\r\n")
            await w.drain()
            if not (await reader.readline()).strip():
                return False
            w.write(f"{tag} OK IDLE done\r\n".encode())
        elif command == "LOGOUT":
            w.write(f"* BYE\r\n{tag} OK bye\r\n".encode())
            await w.drain()
            return False
        else:
            w.write(f"{tag} BAD unknown\r\n".encode())
        await w.drain()
        return True
