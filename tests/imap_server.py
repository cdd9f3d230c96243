"""A real Dovecot for the tests: its own config in a temporary folder, TLS from a trustme CA."""

from __future__ import annotations

import imaplib
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.servers import Pki, free_port

DOVECOT = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)

needs_dovecot = pytest.mark.skipif(
    DOVECOT is None or os.geteuid() != 0,
    reason="needs Dovecot (Debian: dovecot-imapd; .ci/run installs it) run as root, which it requires "
    "to start its login processes as dovenull",
)

_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/base
state_dir = {root}/state
log_path = {root}/dovecot.log
ssl = required
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 1
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={root}/mail/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  mailbox Sent {{
    special_use = \\Sent
    auto = create
  }}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


class Dovecot:
    """dovecot -F -c FILE on a free loopback port (implicit TLS), one user per mailbox."""

    def __init__(
        self, pki: Pki, users: dict[str, str], idle: bool = True, extra_conf: str = "", introspection_url: str = ""
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cadenced-dovecot-"))
        self.root.chmod(0o755)  # its login and mail processes run as other users
        for sub in ("base", "state", "mail"):
            (self.root / sub).mkdir()
        os.chown(self.root / "mail", 65534, 65534)
        pki.cert.private_key_pem.write_to_path(str(self.root / "key.pem"))
        pki.cert.cert_chain_pems[0].write_to_path(str(self.root / "cert.pem"))
        (self.root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in users.items()))
        self.port = free_port()
        conf = _CONF.format(root=self.root, port=self.port)
        if introspection_url:  # bearer tokens checked by the tests' own OAuth2 provider
            (self.root / "oauth2.conf").write_text(
                f"introspection_url = {introspection_url}\nintrospection_mode = post\nforce_introspection = yes\n"
                "username_attribute = email\nactive_attribute = active\nactive_value = true\n"
            )
            conf = conf.replace("auth_mechanisms = plain login", "auth_mechanisms = plain login xoauth2 oauthbearer")
            conf += "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
            conf += f"  args = {self.root}/oauth2.conf\n}}\n"
        if not idle:  # a server without IDLE: the watcher has to poll
            conf += "imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE LITERAL+ SPECIAL-USE\n"
        (self.root / "dovecot.conf").write_text(conf + extra_conf)
        self.ca = ssl.create_default_context(cafile=str(pki.ca_file))
        self.users = users
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Dovecot:
        assert DOVECOT is not None
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.client(next(iter(self.users))).logout()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"dovecot did not start; see {self.root / 'dovecot.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self, user: str) -> imaplib.IMAP4_SSL:
        conn = imaplib.IMAP4_SSL("127.0.0.1", self.port, ssl_context=self.ca, timeout=10)
        conn.login(user, self.users[user])
        return conn

    def deliver(self, user: str, message: bytes, folder: str = "INBOX") -> None:
        """Put a message in a folder (IMAP APPEND), as a delivery or a provider's Sent copy would."""
        conn = self.client(user)
        try:
            typ, data = conn.append(folder, None, None, message)
            assert typ == "OK", data
        finally:
            conn.logout()

    def imap_config(self, user: str, password_file: Path, ca_file: Path, **extra: object) -> dict[str, object]:
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "security": "tls",
            "ca_file": str(ca_file),
            "username": user,
            "password_file": str(password_file),
            "timeout": "10s",
            **extra,
        }
