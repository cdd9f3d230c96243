"""`cadenced check`: the schema, its errors with their places, secrets and templates."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import format_duration, load_config, parse_duration, parse_gap, parse_hours
from tests.conftest import Project

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_passes_and_prints_back(tmp_path: Path, project: Project) -> None:
    for name in ("config.example.toml", "templates", "secrets.example"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    project.config_path = tmp_path / "config.example.toml"
    result = project.run("check", write=False)
    assert result.code == 0, result.err
    assert "2 mailboxes" in result.out
    printed = project.run("check", "--print", write=False)
    assert printed.code == 0
    data = tomllib.loads(printed.out)
    assert data["mailboxes"][0]["daily_limit"] == 40
    assert data["mailboxes"][1]["daily_limit"] == 50  # inherited from [defaults]
    assert data["mailboxes"][0]["hours"] == ["08:30-12:00", "13:00-17:30"]
    assert "example-password-change-me" not in printed.out
    # The printed effective config is itself a valid config.
    (tmp_path / "printed.toml").write_text(printed.out)
    project.config_path = tmp_path / "printed.toml"
    assert project.run("check", write=False).code == 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45), ("30m", 1800), ("4h", 14400), ("3d", 259200), ("1d12h", 129600), ("0s", 0), ("1h30m15s", 5415)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "3", "3x", "h", "1m1d", "-5m", "1.5h", "5 m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_gap_and_hours() -> None:
    assert parse_gap("2m-5m") == (120, 300)
    assert parse_gap("30s") == (30, 30)
    with pytest.raises(ValueError):
        parse_gap("5m-2m")
    assert parse_hours("00:00-24:00") == (0, 1440)
    for bad in ("17:00-09:00", "9-17", "09:00-24:30", "25:00-26:00"):
        with pytest.raises(ValueError):
            parse_hours(bad)


def test_every_error_is_listed_with_its_place(project: Project) -> None:
    project.add_mailboxes(2)
    project.data["mailboxes"][1]["smtp"]["port"] = 0
    project.data["mailboxes"][0]["timezone"] = "Mars/Olympus"
    project.data["mailboxes"][0]["colour"] = "blue"
    project.data["defaults"]["gap"] = "5m-2m"
    cadence = project.add_cadence(steps=2)
    cadence["steps"][1]["wait"] = "soon"
    cadence["users"] = ["alice", "carol"]
    project.data["daemon"]["max_connections"] = "many"
    result = project.run("check")
    assert result.code == 2
    for expected in (
        "mailboxes[1].smtp.port: must be 1-65535, got 0",
        "mailboxes[0].timezone: unknown time zone 'Mars/Olympus'",
        "mailboxes[0].colour: unknown key",
        "defaults.gap: range must go from low to high",
        'cadences."c1".steps[1].wait: not a duration',
        "cadences.\"c1\".users[1]: unknown user 'carol'",
        "daemon.max_connections: must be an integer, got a string",
    ):
        assert expected in result.err, result.err
    assert "7 problems" in result.err


def test_malformed_toml_names_the_line(project: Project) -> None:
    project.write('[daemon]\ndatabase = "x.db"\nlog_level = \n')
    result = project.run("check", write=False)
    assert result.code == 2
    assert "line 3" in result.err and str(project.config_path) in result.err


def test_missing_config_file(tmp_path: Path, project: Project) -> None:
    project.config_path = tmp_path / "nope.toml"
    result = project.run("check", write=False)
    assert result.code == 2 and "nope.toml: cannot read" in result.err


def test_config_from_environment(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    project.write()
    monkeypatch.setenv("CADENCED_CONFIG", str(project.config_path))
    from daemon.cli import main

    assert main(["check"]) == 0


def test_secrets_from_file_env_and_credential(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    (project.root / "pw").write_text("s3cret-file\n")
    creds = project.root / "creds"
    creds.mkdir()
    (creds / "bob-smtp").write_text("s3cret-cred")
    monkeypatch.setenv("BOB_PW", "s3cret-env")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    project.add_mailboxes(1, smtp={"username": "u", "password_file": "pw", "security": "starttls"})
    project.add_mailboxes(1, owner="bob", smtp={"username": "u", "password_env": "BOB_PW", "security": "tls"})
    project.add_mailboxes(
        1, owner="bob", prefix="x", smtp={"username": "u", "credential": "bob-smtp", "security": "tls"}
    )
    project.add_cadence()
    project.write()
    config = load_config(project.config_path)
    assert [m.smtp.auth.secret.reveal() for m in config.mailboxes if m.smtp.auth.secret] == [
        "s3cret-file",
        "s3cret-env",
        "s3cret-cred",
    ]
    printed = project.run("check", "--print")
    assert printed.code == 0
    assert "s3cret" not in printed.out + printed.err
    assert "s3cret" not in repr(config)


def test_secret_problems_name_the_place(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_PW", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    project.add_mailboxes(1, smtp={"username": "u", "password_file": "missing-pw", "security": "tls"})
    project.add_mailboxes(1, smtp={"username": "u", "password_env": "NO_SUCH_PW", "security": "tls"})
    project.add_mailboxes(1, smtp={"username": "u", "credential": "x", "security": "tls"})
    project.add_mailboxes(1, smtp={"username": "u", "password": "inline-pw-123", "security": "none"})
    project.add_cadence()
    result = project.run("check")
    assert result.code == 2
    assert "mailboxes[0].smtp.password_file: cannot read" in result.err
    assert "mailboxes[1].smtp.password_env: environment variable NO_SUCH_PW is not set" in result.err
    assert "mailboxes[2].smtp.credential: CREDENTIALS_DIRECTORY is not set" in result.err
    assert 'mailboxes[3].smtp.security: "none" would send the password in clear text' in result.err
    assert "inline-pw-123" not in result.err + result.out


def test_inline_password_readable_by_others_warns(project: Project) -> None:
    project.add_mailboxes(1, smtp={"username": "u", "password": "inline-pw-123", "security": "tls"})
    project.add_cadence()
    project.write()
    project.config_path.chmod(0o644)
    result = project.run("check", write=False)
    assert result.code == 0
    assert "warning: mailboxes[0].smtp.password: inline password" in result.err
    assert "inline-pw-123" not in result.err + result.out
    project.config_path.chmod(0o600)
    assert "warning" not in project.run("check", write=False).err


def test_templates_are_rendered_at_check(project: Project) -> None:
    project.add_mailboxes(1)
    cadence = project.add_cadence(steps=3)
    cadence["steps"][0]["subject"] = "For {{ title }}"
    cadence["steps"][1]["body"] = "{% if %}"
    cadence["steps"][2]["body_file"] = "tpl/step3.txt"
    del cadence["steps"][2]["body"]
    (project.root / "tpl").mkdir()
    (project.root / "tpl" / "step3.txt").write_text("Bye {{ first_name }} from {{ sender_name }}")
    result = project.run("check")
    assert result.code == 2
    assert "cadences.\"c1\".steps[0].subject: undefined variable: 'title' is undefined" in result.err
    assert 'cadences."c1".steps[1].body: template error: line 1' in result.err
    assert "steps[2]" not in result.err  # body_file resolved next to the config and rendered fine
    cadence["fields"] = ["title"]
    cadence["steps"][1]["body"] = "ok"
    assert project.run("check").code == 0


def test_missing_body_file(project: Project) -> None:
    project.add_mailboxes(1)
    cadence = project.add_cadence()
    cadence["steps"][0]["body_file"] = "nope.txt"
    del cadence["steps"][0]["body"]
    result = project.run("check")
    assert result.code == 2 and 'cadences."c1".steps[0].body_file: cannot read' in result.err


def test_step_sender_needs_auto_rotate_off(project: Project) -> None:
    (a,) = project.add_mailboxes(1)
    cadence = project.add_cadence(steps=2)
    cadence["steps"][1]["sender"] = a
    result = project.run("check")
    assert result.code == 2
    assert '"Assign to Sender" is disabled under auto-rotate' in result.err
    cadence["auto_rotate"] = False
    assert project.run("check").code == 0
    cadence["steps"][1]["sender"] = "stranger@else.example"
    result = project.run("check")
    assert result.code == 2 and "is not a mailbox of this cadence's pool" in result.err


def test_cross_references(project: Project) -> None:
    project.add_mailboxes(1, owner="zed")
    project.add_cadence(users=["alice"], mailboxes=["ghost@x.example"])
    project.data["automations"] = [{"name": "a", "cadence": "nope", "owner": "carol", "watch": "in"}]
    result = project.run("check")
    assert result.code == 2
    assert "mailboxes[0].owner: unknown user 'zed'" in result.err
    assert "cadences.\"c1\".mailboxes[0]: unknown mailbox 'ghost@x.example'" in result.err
    assert "automations[0].cadence: unknown cadence 'nope'" in result.err
    assert "automations[0].owner: unknown user 'carol'" in result.err


def test_wrong_types_and_shapes(project: Project) -> None:
    project.data["users"] = {"name": "alice"}
    project.data["defaults"]["days"] = ["mon", "funday"]
    project.data["defaults"]["daily_limit"] = True
    result = project.run("check")
    assert result.code == 2
    assert "users: must be an array of tables ([[users]]), got a table" in result.err
    assert "defaults.days[1]: must be one of mon, tue" in result.err
    assert "defaults.daily_limit: must be an integer, got a boolean" in result.err


_ADDRESS_CHARS = "abcXYZ019.-_+!#$%&'*/=?^`{|}~@\"\\ ()<>[]:;,é"


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=_ADDRESS_CHARS, max_size=40),
        st.builds(
            lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
            st.text(alphabet=_ADDRESS_CHARS, min_size=1, max_size=20),
            st.lists(st.text(alphabet="abz09-", min_size=1, max_size=8), min_size=1, max_size=3),
            st.sampled_from(["com", "example", "test", "local", "arpa", "c0", "io", "x"]),
        ),
    )
)
def test_the_fast_address_check_never_accepts_what_email_validator_refuses(text: str) -> None:
    """The everyday-address shortcut is a subset of email-validator: it may only say yes where the library does."""
    import email_validator

    from daemon.config import plainly_valid

    if plainly_valid(text):
        email_validator.validate_email(text, check_deliverability=False, allow_smtputf8=False)


def test_warmup_and_skip_dates_are_checked_where_they_are(project: Project) -> None:
    project.data["defaults"]["warmup"] = {"start": 5, "step": 2, "every": "1d", "ceiling": 40}
    project.data["defaults"]["skip_dates"] = ["2026-12-24"]
    (a, b, c) = project.add_mailboxes(3)
    project.data["mailboxes"][1].update(warmup={"start": 9, "every": "36h", "ceiling": 4}, skip_dates=["24.12.2026"])
    project.data["mailboxes"][2]["warmup"] = False
    project.add_cadence()
    result = project.run("check")
    assert result.code == 2
    assert "mailboxes[1].warmup.every: must be whole days (1d, 2d, …), got 1d12h" in result.err
    assert "mailboxes[1].warmup.ceiling: must be at least start (9), got 4" in result.err
    assert "mailboxes[1].skip_dates[0]: must be a date such as 2026-12-24, got '24.12.2026'" in result.err
    del project.data["mailboxes"][1]["warmup"], project.data["mailboxes"][1]["skip_dates"]
    config = load_config(project.write())
    first, _, third = (config.mailbox(x).schedule for x in (a, b, c))
    assert first.warmup is not None and first.warmup.ceiling == 40 and first.skip_dates == {"2026-12-24"}
    assert third.warmup is None  # `warmup = false` turns the default off
    printed = project.run("check", "--print")
    assert 'skip_dates = [\n    "2026-12-24",\n]' in printed.out or 'skip_dates = ["2026-12-24"]' in printed.out
    assert 'every = "1d"' in printed.out


def test_a_holiday_calendar_must_exist(project: Project) -> None:
    project.data["defaults"]["holidays"] = ["US", "DE-ZZ", "XX"]
    project.add_mailboxes(1)
    project.add_cadence()
    result = project.run("check")
    assert result.code == 2
    assert "defaults.holidays[1]: no holiday calendar 'DE-ZZ'" in result.err
    assert "defaults.holidays[2]: no holiday calendar 'XX'" in result.err
    assert "holidays[0]" not in result.err


def test_the_api_needs_a_token_and_a_place_to_listen(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    project.data["api"] = {"listen": "8025"}
    result = project.run("check")
    assert result.code == 2
    assert 'api.listen: must be "HOST:PORT" or "unix:/PATH", got \'8025\'' in result.err
    assert "api: needs token_file, token_env or token_credential" in result.err
    (project.root / "t").write_text("a-token-of-some-length-0123456789\n")
    project.data["api"] = {"listen": "unix:/run/cadenced/api.sock", "token_file": "t"}
    config = load_config(project.write())
    assert config.api is not None and config.api.socket == "/run/cadenced/api.sock"
    assert "a-token-of-some-length-0123456789" not in project.run("check", "--print").out


def test_playbooks_name_their_cadence_owner_and_fields(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    (project.root / "t").write_text("a-token-of-some-length-0123456789\n")
    project.data["api"] = {"token_file": "t"}
    project.data["playbooks"] = [
        {"name": "crm", "cadence": "c9", "owner": "carol"},
        {"name": "has space", "cadence": "c1", "owner": "alice"},
        {"name": "forms", "cadence": "c1", "owner": "alice", "fields": {"First Name": "fn", "company": 3}},
        {"name": "forms", "cadence": "c1", "owner": "alice", "fields": {"first_name": "x", "last_name": "x"}},
        {"name": "ok", "cadence": "c1", "owner": "alice", "colour": "red"},
    ]
    result = project.run("check")
    assert result.code == 2
    for line in (
        "playbooks.\"crm\".cadence: unknown cadence 'c9'",
        "playbooks.\"crm\".owner: unknown user 'carol'",
        "playbooks.\"has space\".name: letters, digits, '.', '_' and '-'",
        'playbooks."forms".fields.First Name: a field name is lower case',
        'playbooks."forms".fields.company: must be the incoming JSON key (a string), got an integer',
        "playbooks.\"forms\".fields: the key 'x' fills more than one field",
        'playbooks."ok".colour: unknown key',
    ):
        assert line in result.err, line
    project.data["playbooks"] = [
        {"name": "crm", "cadence": "c1", "owner": "bob", "fields": {"first_name": "FirstName"}}
    ]
    config = load_config(project.write())
    assert config.playbook("crm").field_for() == {"FirstName": "first_name"}
    printed = project.run("check", "--print").out
    assert 'name = "crm"' in printed and 'first_name = "FirstName"' in printed
    del project.data["api"]
    assert "playbooks: defined, but without [api] nothing can reach them" in project.run("check").err


def test_a_reserved_domain_is_named_as_such(project: Project) -> None:
    """`.test`, `.example`-like special-use names: check says why, not only "not an email address"."""
    project.data["users"] = [{"name": "alice"}]
    project.data["mailboxes"] = [{"address": "alice@acme.test", "owner": "alice", "smtp": {"host": "127.0.0.1"}}]
    project.add_cadence()
    result = project.run("check")
    assert result.code == 2
    assert "mailboxes[0].address: not an email address: 'alice@acme.test' (" in result.err
    assert "special-use or reserved name" in result.err
