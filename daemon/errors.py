"""The project's few exception types; only cli.py turns them into exit codes."""

from __future__ import annotations


class CadencedError(Exception):
    """Base of every error cadenced reports to a user."""

    exit_code = 1


class ConfigError(CadencedError):
    """The configuration is invalid; carries every problem found, each naming its place."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.problems))


class UsageError(CadencedError):
    """A command was given something it cannot use (a missing file, a bad argument)."""

    exit_code = 2


class StoreError(CadencedError):
    """The database cannot be used (not a database, a newer schema, unwritable)."""

    exit_code = 2


class StoreUnreachable(StoreError):
    """The database server cannot be reached now (it is down, restarting, or the network is cut): a command
    says so and exits; the daemon waits and tries again."""


class NotFound(CadencedError):
    """A name given (a prospect, a mailbox, a cadence) is not one cadenced knows; the text says the nearest."""

    exit_code = 1


class Refused(CadencedError):
    """The operation is understood but refused; nothing was changed."""

    exit_code = 1


class StoreUnavailable(CadencedError):
    """A statement failed for now (disk full, I/O error, the server gone); what it wrote is rolled back."""

    exit_code = 2


class StoreBusy(StoreUnavailable):
    """Another process holds the write lock (past the timeout, or at once on a connection that does not wait)."""


class StoreDamaged(StoreUnavailable):
    """The database file is damaged (a corrupt page, not a database): restore it from a backup."""


# --- SMTP outcomes (SPEC §5): whose problem a failed transaction is, by type -------------------


class LeaseExpired(CadencedError):
    """PostgreSQL: this daemon's lease on the mailbox may have run out (by its own clock since the last renewal):
    the transaction in hand is abandoned before the end of DATA, so nothing is delivered late."""


class SmtpFailure(CadencedError):
    """A send or probe that did not succeed; its text never holds a secret (redacted on the way in)."""

    reason = "smtp"

    def __init__(self, code: int | None, text: str, *, stage: str = "", enhanced: str = "") -> None:
        self.code = code
        self.text = text
        self.stage = stage
        self.enhanced = enhanced
        super().__init__(f"{code or '-'} {text}")


class MailboxDown(SmtpFailure, ConnectionError):
    """Unreachable, TLS, login refused, lost before DATA: the mailbox is disconnected and probed."""

    reason = "disconnected"


class MailboxRefused(SmtpFailure):
    """The server refuses this sender (send-as denied, sender rejected, HELO refused): a probe cannot fix it."""

    reason = "refused"


class Throttled(SmtpFailure):
    """The server asks the whole client to slow down (421, 4xx at MAIL FROM): the mailbox waits."""

    reason = "throttled"


class ProviderQuota(SmtpFailure):
    """The provider's own sending quota for this sender: the day is full."""

    reason = "daily_limit"


class Uncertain(SmtpFailure):
    """Lost after the end of DATA: maybe delivered, never retried by itself."""

    reason = "uncertain"


class MessageDeferred(SmtpFailure):
    """4xx for this recipient (mailbox full, greylisting): this message is retried later."""

    reason = "transient"


class AddressRejected(SmtpFailure):
    """5xx that says the address does not exist or is disabled: suppressed in every cadence."""

    reason = "bounced"


class Blocked(SmtpFailure):
    """Any other permanent refusal of this message (policy, spam, too big): failed, not suppressed."""

    reason = "blocked"
