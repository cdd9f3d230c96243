"""The daemon's group commit (dispatch.store_front.AsyncStore) on both engines: the sender loops' calls that
arrive together commit in one transaction, and a call that fails is undone alone, its caller told, the
others' writes kept. SQLite gives each call a savepoint; PostgreSQL (in pipeline mode, where a failure may come
to light in a later call's read) rolls the batch back and runs each call alone."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from daemon.dispatch.store_front import AsyncStore
from daemon.errors import Refused
from daemon.store import Store
from daemon.store.engine import commits


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    found: Path | str = tmp_path / "group.db"
    if request.param == "postgresql":
        found = request.getfixturevalue("postgres_url")
    Store.open(found).close()  # the schema, made as a command makes it
    yield found


def _ok(store: Store, key: str) -> str:
    store.set_daemon_state({key: "kept"})
    return key


def _bad(store: Store) -> str:
    store.set_daemon_state({"bad": "kept"})  # written, then the call fails: undone with it
    raise Refused("this call fails after a write")


async def _one_batch(
    db: AsyncStore, keys: str | tuple[str, ...], call: Callable[[str], Awaitable[object]]
) -> dict[str, object]:
    """`call(key)` for each key, started in one event loop pass (one batch of the group commit): each key's
    answer, or the Refused it raised."""
    answers: dict[str, object] = {}
    async with anyio.create_task_group() as running:
        running.start_soon(db.committer)

        async def one(key: str) -> None:
            try:
                answers[key] = await call(key)
            except Refused as exc:
                answers[key] = exc

        async with anyio.create_task_group() as calls:
            for key in keys:
                calls.start_soon(one, key)
        running.cancel_scope.cancel()
    return answers


def _daemon_state(where: Path | str) -> dict[str, str]:
    store = Store.open(where)
    try:
        return store.daemon_state()
    finally:
        store.close()


@pytest.mark.anyio
async def test_a_batch_keeps_every_call_but_the_one_that_fails(where: Path | str) -> None:
    made: list[float] = []
    stop_counting = commits.add(made.append)
    db = AsyncStore(where)
    try:
        answers = await _one_batch(
            db, ("a", "b", "c", "bad", "d", "e"), lambda k: db.grouped(_bad) if k == "bad" else db.grouped(_ok, k)
        )
    finally:
        stop_counting()
        db.close()
    assert {k: v for k, v in answers.items() if k != "bad"} == {k: k for k in "abcde"}
    assert isinstance(answers["bad"], Refused)
    state = _daemon_state(where)
    assert {k: state.get(k) for k in ("a", "b", "c", "d", "e", "bad")} == {
        **dict.fromkeys("abcde", "kept"),
        "bad": None,
    }
    # SQLite: one commit for the six (savepoints); PostgreSQL: the batch rolled back, then five calls alone.
    assert len(made) == (5 if isinstance(where, str) else 1)


@pytest.mark.anyio
async def test_a_batch_asks_every_calls_reads_first_then_runs_each_and_a_failure_still_fails_alone(
    where: Path | str,
) -> None:
    """`grouped(..., ahead=)`: on PostgreSQL every call's `ahead` (writes sent, reads asked, none waited for)
    runs before the first call, so the batch's reads travel together; each call then reads its own answers. A
    call that fails after its ahead wrote is undone alone (with its ahead's write), the others answered from
    what they asked. SQLite reads at once: the calls run without it."""
    events: list[str] = []

    def ahead(store: Store, key: str) -> object:
        events.append(f"ask {key}")
        store.set_daemon_state({f"{key}-asked": "kept"})
        return store.ask_snapshot(key, "2026-12-06", 0.0)

    def turn(store: Store, key: str, asked: object = None) -> str:
        events.append(f"run {key}")
        snap = asked() if callable(asked) else store.snapshot(key, "2026-12-06", 0.0)
        if key == "bad":
            raise Refused("this call fails after its ahead wrote")
        return f"{key} {snap.state} {'asked' if asked is not None else 'read'}"

    db = AsyncStore(where)
    try:
        answers = await _one_batch(db, ("a", "b", "bad", "c"), lambda k: db.grouped(turn, k, ahead=ahead))
    finally:
        db.close()
    remote = isinstance(where, str)
    how = "asked" if remote else "read"
    assert {k: v for k, v in answers.items() if k != "bad"} == {k: f"{k} connected {how}" for k in "abc"}
    assert isinstance(answers["bad"], Refused)
    if remote:  # the batch: every ask first; it failed at `bad`, then each call alone, its ask then its run
        assert events[:4] == ["ask a", "ask b", "ask bad", "ask c"]
        assert events[4:7] == ["run a", "run b", "run bad"]
        assert events[7:] == [f"{step} {k}" for k in ("a", "b", "bad", "c") for step in ("ask", "run")]
    else:  # savepoints, one call after another
        assert events == ["run a", "run b", "run bad", "run c"]
    state = _daemon_state(where)
    asked = {k: state.get(f"{k}-asked") for k in ("a", "b", "bad", "c")}
    if remote:  # the asks' writes kept with their calls; the failed call's undone with it
        assert asked == {"a": "kept", "b": "kept", "bad": None, "c": "kept"}
    else:
        assert set(asked.values()) == {None}  # no ask ran
