"""What `provider = "…"` fills in: the hosts, ports and OAuth2 endpoints of the providers cadenced knows."""

from __future__ import annotations

from dataclasses import dataclass

SENT_COPIES = ("none", "provider", "append")


@dataclass(frozen=True, slots=True)
class Preset:
    """What `provider = "…"` fills in; any key the file sets wins."""

    smtp: tuple[str, int, str]  # host, port, security
    imap: tuple[str, int, str] | None
    token_url: str
    auth_url: str
    scopes: tuple[str, ...]
    sent_copies: str


PROVIDERS = {
    # Google: SMTP and IMAP accept XOAUTH2 with the one scope that covers mail; Gmail files what is sent in Sent.
    "google": Preset(
        ("smtp.gmail.com", 587, "starttls"),
        ("imap.gmail.com", 993, "tls"),
        "https://oauth2.googleapis.com/token",
        "https://accounts.google.com/o/oauth2/v2/auth",
        ("https://mail.google.com/",),
        "provider",
    ),
    # Microsoft 365 (work and school accounts): SMTP AUTH client submission, which Exchange Online files in
    # Sent Items; offline_access is what brings a refresh token.
    "microsoft": Preset(
        ("smtp.office365.com", 587, "starttls"),
        ("outlook.office365.com", 993, "tls"),
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize",
        (
            "https://outlook.office.com/SMTP.Send",
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access",
        ),
        "provider",
    ),
    # A self-hosted server: the usual ports and security; hosts and auth are the file's to give.
    "generic": Preset(("", 587, "starttls"), None, "", "", (), "none"),
}
