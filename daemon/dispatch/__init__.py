"""Sending: the dispatcher and its rooms.

dispatcher.py   the Dispatcher: a runner per mailbox, timers (APScheduler), leases, housekeeping, stop
runner.py       a mailbox's sender loop: turns, the SMTP connection, what each failure makes happen
turn.py         one turn in one transaction (record, look, claim), and what an accepted send records
store_front.py  the daemon's calls to the store: never waiting on the event loop, turns group-committed
"""

from __future__ import annotations

from daemon.dispatch.dispatcher import CHANGE_POLL, Dispatcher, Stats
from daemon.dispatch.runner import STREAK_KEPT, MailboxRunner
from daemon.dispatch.store_front import AsyncStore
from daemon.dispatch.turn import Sent, Turn, defer_full_domains, sent_record, take_turn

__all__ = [
    "CHANGE_POLL",
    "STREAK_KEPT",
    "AsyncStore",
    "Dispatcher",
    "MailboxRunner",
    "Sent",
    "Stats",
    "Turn",
    "defer_full_domains",
    "sent_record",
    "take_turn",
]
