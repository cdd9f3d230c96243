-- The schema of a new SQLite database (version 18). Databases made before are brought to it by the
-- migrations of daemon/store/sqlite.py; a test holds that both give the same tables, columns and indexes.
CREATE TABLE suppressions (
    email TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    message INTEGER
);
CREATE TABLE cadence_pins (
    cadence TEXT PRIMARY KEY,
    auto_rotate INTEGER NOT NULL,
    rotate_among TEXT NOT NULL,
    pinned_at REAL NOT NULL
);
CREATE TABLE enrollments (
    id INTEGER PRIMARY KEY,
    cadence TEXT NOT NULL,
    email TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    owner TEXT NOT NULL,
    adder TEXT NOT NULL,
    fields TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    created_at REAL NOT NULL,
    ended_at REAL,
    outcome TEXT,
    seq INTEGER,
    UNIQUE (email, cadence)
);
CREATE TABLE rotation_counts (
    cadence TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    enrollments INTEGER NOT NULL,
    PRIMARY KEY (cadence, mailbox)
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    enrollment_id INTEGER NOT NULL REFERENCES enrollments(id),
    step INTEGER NOT NULL,
    mailbox TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    due_at REAL NOT NULL,
    sent_at REAL,
    message_id TEXT,
    subject TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    transient_failures INTEGER NOT NULL DEFAULT 0,
    smtp_code INTEGER,
    detail TEXT,
    uncertain_at REAL,
    held_due REAL,
    variant TEXT,
    UNIQUE (enrollment_id, step)
);
CREATE INDEX messages_by_message_id ON messages (message_id) WHERE message_id IS NOT NULL;
CREATE TABLE daily_counts (
    mailbox TEXT NOT NULL,
    day TEXT NOT NULL,
    sent INTEGER NOT NULL,
    refused INTEGER NOT NULL DEFAULT 0,
    bounces INTEGER NOT NULL DEFAULT 0,
    blocks INTEGER NOT NULL DEFAULT 0,
    first_emails INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox, day)
);
CREATE TABLE imap_state (
    mailbox TEXT PRIMARY KEY,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL
);
CREATE TABLE mailbox_health (
    mailbox TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT,
    since REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    next_probe_at REAL,
    last_send_at REAL,
    not_before REAL,
    quota_day TEXT,
    limit_logged_day TEXT,
    throttled_until REAL,
    blocks INTEGER NOT NULL DEFAULT 0,
    paused_reason TEXT
);
CREATE TABLE daemon_state (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE rotation_cursors (
    cadence TEXT NOT NULL,
    grp TEXT NOT NULL,
    last TEXT NOT NULL,
    PRIMARY KEY (cadence, grp)
);
CREATE TABLE rotation_credits (
    cadence TEXT NOT NULL,
    grp TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    credit REAL NOT NULL,
    PRIMARY KEY (cadence, grp, mailbox)
);
CREATE TABLE enrollment_counts (
    cadence TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (cadence, state)
);
CREATE TRIGGER enrollment_uncounted AFTER DELETE ON enrollments BEGIN
        UPDATE enrollment_counts SET n = n - 1 WHERE cadence = old.cadence AND state = old.state;
END;
CREATE INDEX messages_due ON messages (mailbox, due_at, id, step, enrollment_id) WHERE state = 'scheduled';
CREATE TABLE message_counts (
    mailbox TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (mailbox, state)
) WITHOUT ROWID;
CREATE TRIGGER message_uncounted AFTER DELETE ON messages BEGIN
        UPDATE message_counts SET n = n - 1 WHERE mailbox = old.mailbox AND state = old.state;
END;
CREATE TABLE sent_copies (
    message INTEGER PRIMARY KEY,
    mailbox TEXT NOT NULL,
    message_id TEXT NOT NULL,
    content BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT
);
CREATE INDEX sent_copies_mailbox ON sent_copies (mailbox, message);
CREATE TABLE domain_counts (
    mailbox TEXT NOT NULL,
    day TEXT NOT NULL,
    domain TEXT NOT NULL,
    sent INTEGER NOT NULL,
    PRIMARY KEY (mailbox, day, domain)
) WITHOUT ROWID;
CREATE TABLE api_requests (
    key TEXT PRIMARY KEY,
    playbook TEXT NOT NULL,
    digest TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX api_requests_created ON api_requests (created_at);
CREATE INDEX messages_state ON messages (state, mailbox, reason) WHERE state = 'sending' OR state = 'error' OR state = 'sent' OR state = 'failed' OR state = 'cancelled';
CREATE INDEX messages_due_follow_ups ON messages (mailbox, due_at, id) WHERE state = 'scheduled' AND step > 1;
CREATE INDEX messages_uncertain ON messages (mailbox, uncertain_at) WHERE state = 'error' AND reason = 'uncertain';
CREATE TABLE cadence_counts (
    mailbox TEXT NOT NULL,
    cadence TEXT NOT NULL,
    day TEXT NOT NULL,
    first_emails INTEGER NOT NULL,
    PRIMARY KEY (mailbox, cadence, day)
) WITHOUT ROWID;
CREATE TABLE cadence_pauses (
    cadence TEXT PRIMARY KEY,
    paused_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE enrollment_events (
    enrollment_id INTEGER NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX enrollment_events_by_enrollment ON enrollment_events (enrollment_id, at);
-- Results (`cadenced report`, /metrics): what happened, counted as it happens, per cadence, UTC day, step,
-- variant and mailbox. A send counts on its step's row; an enrollment's end (and an outcome marked) on the row of
-- the last step it was sent (step 0 when none was); `enrolled` is counted by the import. The counting is done
-- by TEMP triggers each connection installs (sqlite.py RESULT_COUNTING), by hand on the daemon's group commit.
CREATE TABLE results (
    cadence TEXT NOT NULL,
    day TEXT NOT NULL,
    step INTEGER NOT NULL,
    variant TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    kind TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (cadence, day, step, variant, mailbox, kind)
) WITHOUT ROWID;
-- The results rolled up as they are counted, so that a report reads a few thousand rows, not every day of every
-- mailbox: without the day (the report of all time, by step, variant or mailbox; /metrics) and per day without
-- variant or mailbox (`--by day`, `--since`).
CREATE TABLE result_totals (
    cadence TEXT NOT NULL,
    step INTEGER NOT NULL,
    variant TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    kind TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (cadence, step, variant, mailbox, kind)
) WITHOUT ROWID;
CREATE TABLE result_days (
    cadence TEXT NOT NULL,
    day TEXT NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (cadence, day, step, kind)
) WITHOUT ROWID;
-- Dashboard sign-ins (SPEC §12): the SHA-256 of each session's id (the cookie holds the id, signed), its role.
CREATE TABLE web_sessions (
    digest TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
