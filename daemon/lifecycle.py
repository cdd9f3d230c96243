"""Pure: rules of the engine written once: what follows a step and who sends it; what state a mailbox is in and
whether it takes new prospects.

The sender loop, the IMAP watcher (an uncertain send found in Sent), enroll, `status` and `plan` all ask here;
none keeps a copy. A copy is how `plan` came to forecast a follow-up on the mailbox of the previous step while
the daemon sent it from the enrollment's own.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from daemon import compose, timing, unsubscribe
from daemon.model import UNSUBSCRIBE_LINK, Cadence, Config, Mailbox, Schedule, Step


class Next(NamedTuple):
    """The step that follows a send: its number, the mailbox that sends it, when it is due."""

    step: int
    sender: str
    due: float


def next_step(config: Config, cadence: str, step: int, sticky: str, sent_at: float) -> Next | None:
    """What follows step `step` of an enrollment in `cadence`, sent at `sent_at`; None when the enrollment is
    done (that was the last step, or the cadence is no longer in the config: nothing can be written for it).

    Sticky (SPEC §3): a step with its own `sender` ("Assign to Sender", auto_rotate off) goes from it; every
    other step from the enrollment's sender (`sticky`), never from whichever mailbox sent the step before.
    A step's `wait` runs from the previous step's actual send.
    """
    try:
        steps = config.cadence(cadence).steps
    except KeyError:
        return None
    if step >= len(steps):
        return None
    following = steps[step]
    return Next(following.number, following.sender or sticky, sent_at + following.wait)


MAILBOX_STATES = ("connected", "paused", "disconnected", "refused")


def mailbox_state(config_paused: bool, stored: str | None, paused_reason: str | None) -> str:
    """What a mailbox is: `paused` by the config (`paused = true`) or in the database (pause_on, `mailbox pause`),
    else what its health row says (`disconnected`, `refused`), else `connected` (no row: it never failed)."""
    if config_paused or paused_reason is not None:
        return "paused"
    if stored in ("disconnected", "refused"):
        return stored
    return "connected"


def takes_new_prospects(state: str, daily_limit: int) -> bool:
    """May rotation give this mailbox new enrollments (SPEC §3 "eligible")? Connected, with a limit above 0."""
    return state == "connected" and daily_limit > 0


def may_send(
    schedule: Schedule,
    now: float,
    day: str,
    *,
    at: float | None,
    sent_today: int,
    quota_day: str | None,
    gap_until: float | None,
    throttled_until: float | None,
    first_day: str | None,
    clock: timing.SenderClock | None = None,
) -> timing.Decision:
    """When a connected mailbox may next send, at or after `at` (its earliest due message; None: now): its
    window, gap, a throttle, its daily limit (or the provider's quota, which fills the day), warm-up and skip
    dates. `sent_today` counts `now`'s local `day`; `first_day` is the day of its first send ever (warm-up).
    `clock`: the sender loop's SenderClock (the same rule, with what it has worked out kept)."""
    full = timing.day_count(sent_today, schedule.daily_limit, quota_day, day)
    start = now if at is None else max(now, at)
    if clock is not None:
        return clock.next_allowed(start, gap_until, {day: full}, throttled_until, first_day)
    return timing.next_allowed(start, schedule, gap_until, {day: full}, throttled_until, first_day)


def step_of(config: Config, cadence: str, step: int) -> tuple[Cadence | None, Step | None]:
    """The cadence and step a claimed message is of; None for what the config no longer has (it is not sent:
    `config_changed`), which `plan` does not count either."""
    try:
        c = config.cadence(cadence)
    except KeyError:
        return None, None
    return c, (c.steps[step - 1] if 0 < step <= len(c.steps) else None)


def unfilled(steps: Iterable[Step], variables: Mapping[str, Any]) -> list[tuple[Step, str, compose.TemplateProblem]]:
    """Whether a prospect's fields fill the steps: each (step, "subject" or "body") `variables` cannot fill, and
    why; empty when every one is filled. Enroll asks it of a file's columns and of each row it doubts, `check`
    of the sample fields."""
    problems = []
    for step in (version for s in steps for version in s.versions()):
        for part, template in (("subject", step.subject), ("body", step.body)):
            if template is None:
                continue
            try:
                template.render(variables)
            except compose.TemplateProblem as exc:
                problems.append((step, part, exc))
    return problems


def thread_start(cadence: Cadence, number: int) -> int:
    """The step that began the thread step `number` goes in: the last one at or before it with thread = "new"
    (step 1 begins the first)."""
    for s in range(number, 1, -1):
        if cadence.steps[s - 1].new_thread:
            return s
    return 1


def variant_of(cadence: str, step: Step, seq: int) -> tuple[Step, str | None]:
    """The version of `step` the enrollment numbered `seq` in its cadence gets, and its variant's name (None: the
    step has no variants). Every `W` enrollments in a row (W: the weights' sum) get each variant as often as its
    weight, in an order shuffled per block, cadence and step: even (by weight) at every count, the same on every
    retry, and unrelated to rotation's turns (which also go in order) and to the other steps' variants."""
    if not step.variants:
        return step, None
    order = _variant_order(cadence, step.number, tuple(v.weight for v in step.variants), seq // _weights(step))
    v = step.variants[order[seq % len(order)]]
    return v.step, v.name


def variant_named(step: Step, name: str) -> Step:
    """The version of `step` that is its variant `name` (a preview's choice), or KeyError saying the names."""
    for v in step.variants:
        if v.name == name:
            return v.step
    names = ", ".join(v.name for v in step.variants) or "none: the step has no variants"
    raise KeyError(f"step {step.number} has no variant {name!r} (its variants: {names})")


def _weights(step: Step) -> int:
    return sum(v.weight for v in step.variants)


@functools.lru_cache(maxsize=4096)
def _variant_order(cadence: str, step: int, weights: tuple[int, ...], block: int) -> tuple[int, ...]:
    order = [i for i, w in enumerate(weights) for _ in range(w)]
    random.Random(f"{cadence}\0{step}\0{block}").shuffle(order)
    return tuple(order)


def render_step(
    cadence: Cadence, step: Step, variables: Mapping[str, Any], first: str | None, seq: int = 0
) -> tuple[str, str]:
    """(subject, body) of a step for one prospect's variables, or compose.TemplateProblem. `step` is the version
    the prospect gets (variant_of; `seq`: the enrollment's number in its cadence). A step without its own subject
    goes as a reply in its thread: `Re:` the thread's first subject (`first`, as sent; None: the subject of the
    step that began the thread in the prospect's variant, rendered now). The subject is one line, its whitespace
    runs made single spaces."""
    body = step.body.render(variables)
    if step.subject is not None:
        subject = step.subject.render(variables)
    else:
        if first is None:
            first_step, _ = variant_of(cadence.name, cadence.steps[thread_start(cadence, step.number) - 1], seq)
            first = first_step.subject.render(variables) if first_step.subject else ""
        subject = compose.thread_subject(first, None)
    return " ".join(subject.split()), body


def unsubscribe_links(mailbox: Mailbox, key: bytes, enrollment: int, email: str) -> tuple[str, ...]:
    """The List-Unsubscribe URIs of an enrollment's messages: the mailto with its token, then the mailbox's https
    one-click link when it has `unsubscribe_url` (compose.TemplateProblem when that renders to no https link)."""
    links: tuple[str, ...] = (unsubscribe.mailto(mailbox.address, key, enrollment),)
    if mailbox.unsubscribe_url is not None:
        url = mailbox.unsubscribe_url.render(
            {"token": unsubscribe.token(key, enrollment), "email": email, "mailbox": mailbox.address}
        )
        if not UNSUBSCRIBE_LINK.fullmatch(url):
            raise compose.TemplateProblem(f"unsubscribe_url made {url[:80]!r}, not an https:// link")
        links = (links[0], url)
    return links


class Composed(NamedTuple):
    """A message of a step as it leaves: what compose.build_message writes, and the variant it is."""

    out: compose.Outgoing
    variant: str | None


def compose_step(
    cadence: Cadence,
    step: Step,
    mailbox: Mailbox,
    fields: Mapping[str, str],
    *,
    enrollment: int,
    seq: int,
    thread: Sequence[tuple[int, str, str]],
    links: tuple[str, ...],
    message_id: str,
    date: float,
    variant: str | None = None,
) -> Composed:
    """Step `step` of enrollment `enrollment` (numbered `seq` in its cadence), sent by `mailbox` to the prospect
    whose `fields` these are, in its thread (`thread`: (step, message_id, subject) of what was sent before, in
    order): the variant it gets (`variant`: a preview's choice instead), the subject and body rendered with the
    mailbox's signature and `spin`'s seed, the HTML part of a Markdown step, and the thread headers of the thread
    the step goes in. The sender loop and `preview` both compose here. compose.TemplateProblem when a template
    cannot be rendered."""
    signature = mailbox.signature
    signed = signature.render(compose.sender_variables(mailbox.name, mailbox.address)) if signature else ""
    seed = f"{enrollment}:{step.number}"
    variables = compose.prospect_variables(fields, mailbox.name, mailbox.address, links[-1], signed, seed)
    # The thread this step goes in: from the step that began it (step 1, or the last thread = "new").
    start = thread_start(cadence, step.number)
    thread = [t for t in thread if t[0] >= start]
    if variant is None:
        version, variant = variant_of(cadence.name, step, seq)
    else:
        version = variant_named(step, variant)
    first = thread[0][2] if thread else None
    subject, body = render_step(cadence, version, variables, first, seq)
    html = None
    if version.markdown:  # the HTML part: the same body, the prospect's fields read literally by Markdown
        safe = {k: compose.markdown_safe(v) if k in fields else v for k, v in variables.items()}
        safe["signature"] = compose.markdown_signature(signed)
        html = compose.markdown_html(version.body.render(safe))
    references = tuple(mid for _, mid, _ in thread if mid)
    out = compose.Outgoing(
        from_name=mailbox.name,
        from_address=mailbox.address,
        to_address=fields["email"],
        subject=subject,
        body=body,
        message_id=message_id,
        date=date,
        in_reply_to=references[-1] if references else None,
        references=references,
        unsubscribe=links,
        html=html,
    )
    return Composed(out, variant)


Due = tuple[float, tuple[int, int]]  # (due time, rank): the claim's order is (due_at, id)


def goes_first(prioritize: str, follow_up: Due | None, new: Due | None, at: float, new_ok: bool = True) -> str | None:
    """Which kind a mailbox sends at `at` of its oldest scheduled follow-up and first email ("follow_up", "new",
    None: neither is due), the claim's rule (SPEC §4): follow-ups first by default, first emails first with
    "new", the older with "due"; `new_ok` False: the day's first emails are sent (new_per_day)."""
    f = follow_up if follow_up is not None and follow_up[0] <= at else None
    n = new if new is not None and new[0] <= at and new_ok else None
    if f is None or n is None:
        return "follow_up" if f is not None else ("new" if n is not None else None)
    if prioritize == "due":
        return "follow_up" if f < n else "new"
    return "new" if prioritize == "new" else "follow_up"
