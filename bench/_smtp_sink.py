"""A minimal SMTP server for the email benchmark: every reply waits a fixed delay, messages are only counted.

`python -m bench._smtp_sink --port P --delay 0.02 --stats FILE`. It speaks enough SMTP for smtplib
(greeting, EHLO/HELO, MAIL, RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT) and sends every reply,
the greeting and DATA's 354 included, after `asyncio.sleep(delay)`, as a remote MTA doing DNS and
spam checks would. It keeps no messages: it counts them, counts distinct Message-IDs (so a
benchmark can check exactly-once delivery) and writes those counts with the first and last arrival
times to FILE as JSON every 0.1 s and on exit. The sink must cost far less CPU per message than
the client it measures: aiosmtpd (proj.stack.devsmtp) spends 1.5-2 ms per message, this about a tenth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

MAX_MESSAGE = 64 * 1024 * 1024
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
_REPLIES = {
    b"HELO": b"250 sink\r\n",
    b"MAIL": b"250 OK\r\n",
    b"RCPT": b"250 OK\r\n",
    b"RSET": b"250 OK\r\n",
    b"NOOP": b"250 OK\r\n",
}
_EHLO = b"250-sink\r\n250-8BITMIME\r\n250-SIZE %d\r\n250 SMTPUTF8\r\n" % MAX_MESSAGE


class Stats:
    """What the sink received: messages, distinct Message-IDs, first and last arrival."""

    def __init__(self) -> None:
        self.messages = 0
        self.ids: set[bytes] = set()
        self.first = 0.0
        self.last = 0.0

    def add(self, data: bytes) -> None:
        """Count one message; its Message-ID is read from the header block only."""
        now = time.time()
        self.first = self.first or now
        self.last = now
        self.messages += 1
        match = _MESSAGE_ID.search(data, 0, data.find(b"\r\n\r\n") % (len(data) + 1))
        if match:
            self.ids.add(match.group(1))

    def write(self, path: Path) -> None:
        """Atomically replace `path` with the counts as JSON."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "messages": self.messages,
                    "message_ids": len(self.ids),
                    "first": self.first,
                    "last": self.last,
                }
            )
        )
        os.replace(tmp, path)


async def _reply(writer: asyncio.StreamWriter, delay: float, line: bytes) -> None:
    await asyncio.sleep(delay)
    writer.write(line)


async def _data(reader: asyncio.StreamReader) -> bytes:
    """The message after 354, up to the lone dot, dot-unstuffed (RFC 5321 4.5.2)."""
    lines = []
    while (line := await reader.readuntil(b"\r\n")) != b".\r\n":
        lines.append(line[1:] if line.startswith(b".") else line)
    return b"".join(lines)


async def _session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, stats: Stats
) -> None:
    """One SMTP connection, one command at a time, each reply after the delay."""
    await _reply(writer, delay, b"220 sink ESMTP\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            await _reply(writer, delay, _EHLO)
        elif verb == b"DATA":
            await _reply(writer, delay, b"354 End data with <CR><LF>.<CR><LF>\r\n")
            stats.add(await _data(reader))
            await _reply(writer, delay, b"250 OK queued\r\n")
        elif verb == b"QUIT":
            await _reply(writer, delay, b"221 Bye\r\n")
            break
        else:
            await _reply(writer, delay, _REPLIES.get(verb, b"500 Command not recognised\r\n"))


async def serve(host: str, port: int, delay: float, stats_file: Path) -> None:
    """Serve until SIGTERM or SIGINT; keep the stats file current."""
    stats = Stats()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _session(reader, writer, delay, stats)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # shutting down with clients still connected
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=MAX_MESSAGE, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        while not stop.is_set():
            stats.write(stats_file)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
    stats.write(stats_file)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench._smtp_sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds before every reply")
    parser.add_argument("--stats", type=Path, required=True, help="JSON file with the counts")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.delay, args.stats))


if __name__ == "__main__":
    main()
