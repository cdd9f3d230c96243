"""CRM exports as they come (SPEC §2a): their header names, delimiters and encodings, empty columns and multi-line
notes, a map for the rest, and a dry run that writes nothing and shows the first email as it would leave."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anyio
import pytest

from daemon import headers
from daemon.api import prospect_rows
from daemon.model import Playbook
from tests.conftest import Project
from tests.daemon_helpers import query, running, until
from tests.servers import SmtpServer

pytestmark = [pytest.mark.both_stores]

HUBSPOT_HEADER = "First Name,Last Name,Email,Company Name,Job Title"
ROWS = [
    ("Dee", "Öberg", "dee@prospects.example", "Acme GmbH", "Head of Ops"),
    ("Sol", "Ruiz", "SOL@prospects.example", "Zeta, Inc.", "CTO"),
    ("Wes", "Li", "wes@prospects.example", "Café Noir", "Owner"),
]
BODY = "Hi {{ first_name }}, as {{ job_title }} at {{ company }} you know the problem.\n\n{{ sender_name }}"


def crm_cadence(project: Project, name: str = "c1") -> None:
    project.data["defaults"]["gap"] = "0s"
    cadence = project.add_cadence(name, fields=["job_title", "notes"])
    cadence["steps"] = [{"wait": "0s", "subject": "A question for {{ company }}", "body": BODY}]


def export(rows: list[tuple[str, ...]], sep: str = ",", header: str = HUBSPOT_HEADER) -> str:
    def cell(value: str) -> str:
        return f'"{value}"' if sep in value or "\n" in value or '"' in value else value

    return "\r\n".join([header.replace(",", sep), *(sep.join(cell(v) for v in row) for row in rows)]) + "\r\n"


def enrolled(project: Project, cadence: str = "c1") -> dict[str, dict[str, str]]:
    """The stored prospects of a cadence: address → fields."""
    rows = query(project.database, "SELECT email, fields FROM enrollments WHERE cadence = ? ORDER BY email", cadence)
    return {email: json.loads(fields) for email, fields in rows}


def test_a_hubspot_export_fills_every_field(project: Project) -> None:
    """BOM, CR LF, capitalised names with spaces: each column lands on the field the template reads."""
    project.add_mailboxes(1)
    crm_cadence(project)
    path = project.root / "hubspot.csv"
    path.write_bytes(b"\xef\xbb\xbf" + export(ROWS).encode())
    r = project.enroll(path)
    assert r.code == 0, r.err
    report = r.json()
    assert report["enrolled"] == 3 and report["rejected"] == []
    assert [(c["column"], c["field"]) for c in report["columns"]] == [
        ("First Name", "first_name"),
        ("Last Name", "last_name"),
        ("Email", "email"),
        ("Company Name", "company"),
        ("Job Title", "job_title"),
    ]
    assert report["unused_columns"] == ["Last Name"]
    assert enrolled(project)["dee@prospects.example"] == {
        "first_name": "Dee",
        "last_name": "Öberg",
        "company": "Acme GmbH",
        "job_title": "Head of Ops",
    }


@pytest.mark.parametrize(
    ("name", "sep", "encoding", "args"),
    [
        ("semicolon.csv", ";", "utf-8", ()),
        ("tab.tsv.csv", "\t", "utf-8", ()),
        ("utf16.csv", ",", "utf-16", ()),  # Excel's "Unicode text": a BOM, then UTF-16
        ("cp1252.csv", ";", "cp1252", ("--encoding", "cp1252")),  # European Excel on Windows
    ],
)
def test_other_delimiters_and_encodings_enroll_the_same_prospects(
    project: Project, name: str, sep: str, encoding: str, args: tuple[str, ...]
) -> None:
    project.add_mailboxes(1)
    crm_cadence(project)
    crm_cadence(project, "c2")
    reference = project.root / "reference.csv"
    reference.write_text(export(ROWS), encoding="utf-8")
    project.write()
    assert project.enroll(reference).json()["enrolled"] == 3
    path = project.root / name
    path.write_bytes(export(ROWS, sep).encode(encoding))
    r = project.run("enroll", "--cadence", "c2", "--as", "alice", "--json", *args, str(path))
    assert r.code == 0, r.err
    assert r.json()["enrolled"] == 3
    assert enrolled(project, "c2") == enrolled(project, "c1")
    assert enrolled(project, "c2")["wes@prospects.example"]["company"] == "Café Noir"


def test_an_unreadable_file_says_what_was_tried(project: Project) -> None:
    project.add_mailboxes(1)
    crm_cadence(project)
    project.write()
    cp1252 = project.root / "cp1252.csv"
    cp1252.write_bytes(export(ROWS, ";").encode("cp1252"))
    r = project.enroll(cp1252)
    assert r.code == 2
    assert "cp1252.csv:2: not UTF-8 text (read as UTF-8: the file has no byte-order mark" in r.err
    assert "--encoding cp1252" in r.err
    no_bom = project.root / "utf16le.csv"
    no_bom.write_bytes(export(ROWS).encode("utf-16-le"))
    r = project.enroll(no_bom)
    assert r.code == 2 and "utf16le.csv:1: UTF-16 text without a byte-order mark: give --encoding utf-16-le" in r.err
    assert project.run("enroll", "--cadence", "c1", "--as", "alice", "--encoding", "utf-16-le", str(no_bom)).code == 0
    ascii_only = project.root / "ascii.csv"
    ascii_only.write_bytes(export(ROWS[2:], ";").encode("cp1252"))
    r = project.run("enroll", "--cadence", "c1", "--as", "alice", "--encoding", "ascii", str(ascii_only))
    assert r.code == 2 and "ascii.csv:2: not ascii text" in r.err  # "Café" on line 2
    r = project.run("enroll", "--cadence", "c1", "--as", "alice", "--encoding", "klingon", str(ascii_only))
    assert r.code == 2 and "--encoding 'klingon': not an encoding" in r.err
    both = project.root / "both.csv"
    both.write_text("email,first_name;company;job_title,x\n")
    r = project.enroll(both)
    assert r.code == 2 and "cannot tell the delimiter from the header row (2 commas, 2 semicolons)" in r.err
    r = project.run("enroll", "--cadence", "c1", "--as", "alice", "--delimiter", ",", "--json", str(both))
    assert r.code == 2 and "cannot be filled" in r.err  # read at commas: no company column


def test_usual_crm_names_and_a_map(project: Project) -> None:
    project.add_mailboxes(1)
    crm_cadence(project)
    project.write()
    salesforce = project.root / "salesforce.csv"
    salesforce.write_text(
        "Given Name,Surname,E-mail,Account Name,Title,Lead Source\nAnn,Ek,ann@prospects.example,Acme,VP Sales,Webinar\n"
    )
    r = project.enroll(salesforce)
    assert r.code == 2 and "cannot be filled from this file's columns" in r.err and "job_title" in r.err
    r = project.run("enroll", "--cadence", "c1", "--as", "alice", "--json", "--map", "Title=job_title", str(salesforce))
    assert r.code == 0, r.err
    assert enrolled(project)["ann@prospects.example"] == {
        "first_name": "Ann",
        "last_name": "Ek",
        "company": "Acme",
        "job_title": "VP Sales",
        "lead_source": "Webinar",
    }
    twice = project.root / "twice.csv"
    twice.write_text("Email,Work Email,First Name,Company,Job Title\na@x.example,b@x.example,A,Co,T\n")
    r = project.enroll(twice)
    assert r.code == 2
    assert "columns 1 ('Email') and 2 ('Work Email') both fill the field 'email'" in r.err
    assert '--map "Work Email="' in r.err
    r = project.run("enroll", "--cadence", "c1", "--as", "alice", "--json", "--map", "work email=", str(twice))
    assert r.code == 0 and r.json()["enrolled"] == 1, r.err
    assert "work_email" not in enrolled(project)["a@x.example"]
    for bad, said in [
        ("Phone=phone number", "'phone number' is not a field name"),
        ("nocolumn", 'write it as "Column=field"'),
        ("Fax=fax", "map 'Fax': no such column in the header row"),
    ]:
        r = project.run("enroll", "--cadence", "c1", "--as", "alice", "--map", bad, str(twice))
        assert r.code == 2 and said in r.err, (bad, r.err)


def test_empty_columns_and_notes_enroll_a_subject_field_keeps_its_line(project: Project) -> None:
    """Excel's trailing empty columns are left out; a note over several lines is kept; a line break in a field
    the subject reads is refused on its own line, and a value under a nameless column names that column."""
    project.add_mailboxes(1)
    crm_cadence(project)
    project.data["cadences"][0]["steps"][0]["body"] = BODY + "\n\n{{ notes | default('') }}"
    project.write()
    path = project.root / "notes.csv"
    path.write_text(
        "Email,First Name,Company,Job Title,Notes,,\r\n"  # 1
        'a@prospects.example,Ann,Acme,CEO,"Met at the fair.\r\nWants a call\r\nin March.",,\r\n'  # 2-4
        'b@prospects.example,Bo,"Beta\r\nBcc: x@evil.example",CTO,,,\r\n'  # 5-6: the subject reads company
        "c@prospects.example,Cy,Gamma,COO,,,stray\r\n"  # 7
        "d@prospects.example,Di,Delta,CFO,Short row\r\n"  # 8: the nameless cells left out
        "e@prospects.example,Ed,Eps,CMO,,,,,\r\n",  # 9: more empty cells than the header has
        encoding="utf-8",
    )
    r = project.enroll(path)
    assert r.code == 0, r.err
    report = r.json()
    assert report["enrolled"] == 3
    assert [(x["line"], x["reason"]) for x in report["rejected"]] == [
        (5, "a line break in field 'company' (a subject uses it)"),
        (7, "a value in column 7, which has no name in the header row"),
    ]
    stored = enrolled(project)
    assert stored["a@prospects.example"]["notes"] == "Met at the fair.\nWants a call\nin March."
    assert set(stored) == {"a@prospects.example", "d@prospects.example", "e@prospects.example"}
    assert "" not in stored["a@prospects.example"]


def test_a_dry_run_writes_nothing_and_shows_the_first_email(project: Project) -> None:
    project.add_mailboxes(2)
    crm_cadence(project)
    project.write()
    assert project.enroll(project.csv(["old@prospects.example,Old,Co"], header="email,first_name,job_title")).code == 2
    project.data["cadences"][0]["steps"][0]["body"] = BODY
    assert project.enroll(project.people(1)).code == 2  # no job_title: refused, nothing made
    path = project.root / "hubspot.csv"
    path.write_bytes(b"\xef\xbb\xbf" + export([*ROWS, ("Bad", "Row", "not-an-address", "X", "Y")]).encode())
    project.run("status")  # the database exists, at today's schema
    before = database_state(project)
    r = project.run("enroll", "--cadence", "c1", "--as", "alice", "--dry-run", str(path))
    assert r.code == 0, r.err
    assert database_state(project) == before
    text = r.out
    assert "dry run: nothing was written" in text
    assert "would enroll 3, skip 0 (already enrolled), reject 1" in text
    assert "line 5: not-an-address: not a valid email address" in text
    assert "columns read as: 'First Name' → first_name" in text and "'Job Title' → job_title" in text
    assert "columns no template of cadence 'c1' uses (kept with the prospects): Last Name" in text
    assert "first emails by " in text
    assert "first email (step 1), from mailbox mb1@alice.example:" in text
    assert "  From: Mb1 <mb1@alice.example>" in text
    assert "  To: dee@prospects.example" in text
    assert "  Subject: A question for Acme GmbH" in text
    assert "  Hi Dee, as Head of Ops at Acme GmbH you know the problem." in text
    js = project.run("enroll", "--cadence", "c1", "--as", "alice", "--dry-run", "--json", str(path)).json()
    assert js["dry_run"] is True and js["enrolled"] == 3 and js["rejected_total"] == 1
    assert js["first_email"]["subject"] == "A question for Acme GmbH"
    assert js["first_email"]["to"] == "dee@prospects.example"
    assert set(js["first_emails_by"]) == {"mb1@alice.example", "mb2@alice.example"}
    assert database_state(project) == before
    # The same file for real: what the dry run said is what it does.
    real = project.enroll(path).json()
    assert real["enrolled"] == 3 and real["assignments"] == js["assignments"]
    assert real["first_emails_by"] == js["first_emails_by"]


def database_state(project: Project) -> str:
    """The database, byte for byte (SQLite's file), or every row of every table (PostgreSQL's)."""
    if isinstance(project.database, Path):
        wal = project.database.with_name(project.database.name + "-wal")
        files = [project.database.read_bytes(), wal.read_bytes() if wal.exists() else b""]
        return "/".join(hashlib.sha256(data).hexdigest() for data in files)
    tables = [t for (t,) in query(project.database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    return json.dumps({t: sorted(map(repr, query(project.database, f"SELECT * FROM {t}"))) for t in sorted(tables)})


def test_playbook_keys_are_read_as_csv_columns() -> None:
    book = Playbook("crm", "c1", "alice", mapping=(("Title", "job_title"),))
    header, rows = prospect_rows(
        {"prospects": [{"Email Address": "a@x.example", "First Name": "Ann", "Title": "CEO", "Lead Source": "Ads"}]},
        book,
    )
    assert header == ["email", "first_name", "job_title", "lead_source"]
    assert rows == [(0, ["a@x.example", "Ann", "CEO", "Ads"])]


@pytest.mark.anyio
@pytest.mark.slow
async def test_crm_files_render_at_the_server(project: Project) -> None:
    """The HubSpot export by `enroll`, and a European Excel file (cp1252, semicolons, its own column names)
    dropped into an automation's folder with a `map`: every field of every email arrives filled."""
    server = SmtpServer().start()
    try:
        inbox = project.root / "inbox"
        project.add_mailboxes(2, smtp=server.smtp_config())
        crm_cadence(project)
        project.data["automations"] = [
            {
                "name": "fair",
                "cadence": "c1",
                "owner": "alice",
                "watch": str(inbox),
                "settle": "1s",
                "encoding": "cp1252",
                "map": {
                    "Vorname": "first_name",
                    "Nachname": "last_name",
                    "Firma": "company",
                    "Position": "job_title",
                    "Notiz": "",
                },
            }
        ]
        hubspot = project.root / "hubspot.csv"
        hubspot.write_bytes(b"\xef\xbb\xbf" + export(ROWS).encode())
        assert project.enroll(hubspot).json()["enrolled"] == 3
        excel = [("Jörg", "Müller", "jorg@prospects.example", "Bäckerei Süß", "Inhaber", "note")]
        async with running(project.config_path):
            await until(lambda: inbox.is_dir())
            text = export(excel, ";", "Vorname,Nachname,E-Mail,Firma,Position,Notiz")
            (inbox / "messe.csv.part").write_bytes(text.encode("cp1252"))
            (inbox / "messe.csv.part").rename(inbox / "messe.csv")
            got = await anyio.to_thread.run_sync(server.recorder.wait_for, 4)
        bodies = {d.recipient: (d["Subject"], d.headers.get_body().get_content()) for d in got}
        for first, _, email, company, title, *_ in [*ROWS, *excel]:
            subject, body = bodies[email.lower()]
            assert subject == f"A question for {company}"
            assert f"Hi {first}, as {title} at {company} you know the problem." in body
        report = json.loads(next((inbox / "processed").glob("*.report.json")).read_text())
        assert report["enrolled"] == 1 and enrolled(project)["jorg@prospects.example"]["last_name"] == "Müller"
        assert "notiz" not in enrolled(project)["jorg@prospects.example"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("column", "field"),
    [
        ("First Name", "first_name"),
        ("first-name", "first_name"),
        ("FIRST_NAME", "first_name"),
        ("Firstname", "first_name"),
        ("Given Name", "first_name"),
        ("Surname", "last_name"),
        ("Family Name", "last_name"),
        ("E-mail", "email"),
        ("Email Address", "email"),
        ("Work Email", "email"),
        ("Business Email", "email"),
        ("Company Name", "company"),
        ("Account Name", "company"),
        ("Organization", "company"),
        ("Job Title", "job_title"),
        ("  Lead Source  ", "lead_source"),
        ("Phone (work)", "phone_work"),
        ("Title", "title"),
    ],
)
def test_column_names(column: str, field: str) -> None:
    assert headers.field_name(column) == field


def test_a_template_variable_spelt_otherwise_is_found() -> None:
    assert headers.field_name("LinkedInURL", ["linkedin_url"]) == "linkedin_url"
    assert headers.read_header(["#", "Email", ""]).columns == (("#", "column_1"), ("Email", "email"), ("", ""))


def test_a_bad_map_in_the_config_names_its_place(project: Project) -> None:
    project.add_mailboxes(1)
    crm_cadence(project)
    inbox = str(project.root / "in")
    project.data["automations"] = [
        {"name": "a", "cadence": "c1", "owner": "alice", "watch": inbox, "map": {"Title": "Job Title"}},
        {"name": "b", "cadence": "c1", "owner": "alice", "watch": inbox, "encoding": "klingon", "delimiter": "|"},
    ]
    r = project.run("check")
    assert r.code == 2
    assert "automations[0].map: 'Title': 'Job Title' is not a field name" in r.err
    assert "automations[1].encoding: 'klingon' is not an encoding" in r.err
    assert "automations[1].delimiter: must be one of" in r.err
