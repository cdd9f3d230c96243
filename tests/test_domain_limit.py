"""domain_daily_limit as a property: over random lists, zones (DST days among them) and limits, the daemon's
rule never sends a domain more than its share or a day more than its limit, and `plan` forecasts exactly
what the rule sends, day by day."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from daemon import readside, timing
from daemon.config import build_config
from daemon.dispatch import defer_full_domains
from daemon.enroll import Importer
from daemon.store import SentRecord, Store, domain_of

ZONES = ["Europe/Berlin", "America/New_York", "UTC", "Australia/Lord_Howe"]
STARTS = [1774749600.0, 1792144800.0, 1772964000.0, 1795000000.0, 1781000000.0]  # DST change days, and others
GAP = 600.0


@settings(max_examples=40, deadline=None)
@example(  # the run moves every due message of a full domain at once: the plan once moved only the one it met
    tz="UTC",
    start=1774706400.0,
    hours=["00:00-24:00"],
    daily_limit=2,
    cap=1,
    domains=["c.example", "c.example", "b.example", "c.example", "a.example", "b.example", "a.example", "b.example"],
)
@example(  # the order the run gives messages moved at different moments: the later moved, the sooner due
    tz="UTC",
    start=1774753421.0757854,
    hours=["01:30-03:30", "22:00-23:00"],
    daily_limit=5,
    cap=2,
    domains=[f"{d}.example" for d in "cbcbbacabaabababacccbabbabab"],
)
@given(
    tz=st.sampled_from(ZONES),
    start=st.sampled_from(STARTS).flatmap(lambda s: st.floats(s - 43200, s + 43200)),
    hours=st.sampled_from([["00:00-24:00"], ["09:00-17:00"], ["01:30-03:30", "22:00-23:00"]]),
    daily_limit=st.integers(1, 8),
    cap=st.integers(1, 4),
    domains=st.lists(st.sampled_from(["a.example", "b.example", "c.example"]), min_size=1, max_size=30),
)
def test_the_run_keeps_every_share_and_plan_forecasts_it(
    tz: str, start: float, hours: list[str], daily_limit: int, cap: int, domains: list[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = {
            "daemon": {"database": str(root / "db.sqlite")},
            "defaults": {
                "timezone": tz,
                "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                "hours": hours,
                "daily_limit": daily_limit,
                "gap": "10m",
                "domain_daily_limit": cap,
            },
            "users": [{"name": "u"}],
            "mailboxes": [{"address": "m@x.example", "owner": "u", "smtp": {"host": "127.0.0.1"}}],
            "cadences": [{"name": "c", "users": ["u"], "steps": [{"subject": "Hi", "body": "Hello"}]}],
        }
        config = build_config(data, root / "cadenced.toml")
        csv = root / "people.csv"
        csv.write_text("email\n" + "".join(f"p{i}@{d}\n" for i, d in enumerate(domains)))
        store = Store.open(config.daemon.database)
        try:
            Importer(store, config, "c", "u").run(csv, start)
            days = 5
            forecast = Counter({r["date"]: r["sends"] for r in readside.plan(config, store, start, days)["days"]})
            sent_days, shares = run(store, config, start, start + days * 86400)
        finally:
            store.close()
        assert sent_days == forecast
        assert all(n <= cap for n in shares.values()), shares
        assert all(n <= daily_limit for n in sent_days.values()), sent_days


def run(store: Store, config, start: float, end: float) -> tuple[Counter[str], Counter[tuple[str, str]]]:  # type: ignore[no-untyped-def]
    """The sender loop's decisions, turn by turn, through the store (no SMTP): what `_turn` does."""
    mailbox = config.mailboxes[0]
    schedule = mailbox.schedule
    days: Counter[str] = Counter()
    shares: Counter[tuple[str, str]] = Counter()
    t = start
    for _ in range(2000):
        day = timing.local_day(t, schedule.timezone)
        snap = store.snapshot(mailbox.address, day, timing.local_day_start(t, schedule.timezone))
        if snap.earliest_due is None:
            break
        decision = timing.next_allowed(
            max(t, snap.earliest_due), schedule, snap.gap_until, {day: snap.sent_today}, None, snap.first_day
        )
        if decision.at is None or decision.at >= end:
            break
        if decision.at > t:
            t = decision.at
            continue
        with store.transaction():
            deferred = defer_full_domains(store, mailbox, t, day, snap.first_day)
            claimed = (
                store.claim(mailbox.address, t, lambda i, a: f"<{i}.{a}@x.example>") if deferred is not None else None
            )
        if claimed is None:
            continue
        store.record_sent(SentRecord(claimed, t, 250, "ok", "Hi", day, t + GAP, None, None, True))
        days[day] += 1
        shares[(day, domain_of(claimed.email))] += 1
    return days, shares
