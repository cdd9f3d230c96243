-- The statements PostgreSQL says its own way: pg_temp, lists as arrays (unnest), greatest(), and its
-- leases (several daemons on one database), in the server's time.

-- name: drop_import_rows
DROP TABLE IF EXISTS pg_temp.import_rows;

-- name: stage_import
INSERT INTO pg_temp.import_rows (line, email, owner, fields) VALUES (?, ?, ?, ?);

-- name: index_staged_by_email
CREATE INDEX import_by_email ON pg_temp.import_rows (email, line);

-- name: staged_duplicates
SELECT r.n, r.line, r.email, d.first
    FROM (SELECT email, min(line) AS first FROM pg_temp.import_rows GROUP BY email HAVING count(*) > 1) AS d
    JOIN pg_temp.import_rows r ON r.email = d.email AND r.line > d.first;

-- name: drop_staged_row
DELETE FROM pg_temp.import_rows WHERE n = ?;

-- name: staged_suppressed
SELECT i.n, i.line, i.email, s.reason FROM pg_temp.import_rows i JOIN suppressions s ON s.email = i.email;

-- name: drop_staged_enrolled
DELETE FROM pg_temp.import_rows AS i
    WHERE EXISTS (SELECT 1 FROM enrollments e WHERE e.email = i.email AND e.cadence = ?);

-- name: staged_by_owner
SELECT owner, count(*) FROM pg_temp.import_rows GROUP BY owner;

-- name: staged_count
SELECT count(*) FROM pg_temp.import_rows;

-- name: staged
SELECT line, email, owner, fields FROM pg_temp.import_rows ORDER BY n;

-- name: drop_import_turns
DROP TABLE IF EXISTS pg_temp.import_turns;

-- name: drop_import_cycles
DROP TABLE IF EXISTS pg_temp.import_cycles;

-- name: insert_import_cycles
INSERT INTO pg_temp.import_cycles VALUES (?, ?);

-- name: insert_import_turns
INSERT INTO pg_temp.import_turns VALUES (?, ?, ?);

-- name: staged_span
SELECT count(*), coalesce(max(n), 0) FROM pg_temp.import_rows;

-- name: drop_import_cycle
DROP TABLE IF EXISTS pg_temp.import_cycle;

-- name: insert_import_cycle
INSERT INTO pg_temp.import_cycle VALUES (?, ?);

-- name: enroll_staged_in_order
INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at, seq)
    SELECT ?1 + r.n - 1, ?2, r.email,
    (SELECT c.mailbox FROM pg_temp.import_cycle c WHERE c.turn = (r.n - 1) % ?5),
    r.owner, ?3, r.fields, ?4, ?6 + r.n - 1
    FROM pg_temp.import_rows r ORDER BY r.n;

-- name: sent_on_days
SELECT d.mailbox, d.sent FROM json_array_elements(CAST(? AS json)) j
    JOIN daily_counts d ON d.mailbox = j.value->>0 AND d.day = j.value->>1;

-- name: first_send_days
SELECT j.value, (SELECT min(day) FROM daily_counts WHERE mailbox = j.value AND sent > 0)
    FROM json_array_elements_text(CAST(? AS json)) AS j(value);

-- name: failed_kinds
SELECT reason, count(*) FROM messages WHERE state = 'failed' AND reason IN ('bounced', 'blocked')
    AND id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value) GROUP BY reason;

-- name: restore_cancelled
-- (a message held by a paused cadence gets its own due time back: the claim holds it again while paused)
UPDATE messages SET due_at = coalesce(held_due, due_at), held_due = NULL,
    state = 'scheduled', detail = 'restored: the refusal was the sender''s'
    WHERE state = 'cancelled' AND detail IN
    (SELECT ?2 || ' ' || value FROM unnest(CAST(?1 AS bigint[])) AS value UNION SELECT ?3 || ' ' || value FROM unnest(CAST(?1 AS bigint[])) AS value)
    RETURNING enrollment_id;

-- name: unsuppress_messages
DELETE FROM suppressions WHERE message IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value);

-- name: enrollments_of_messages
SELECT enrollment_id FROM messages WHERE id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value);

-- name: reactivate_enrollments
UPDATE enrollments SET state = 'active', ended_at = NULL
    WHERE state IN ('bounced', 'stopped') AND id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value);

-- name: unblock
UPDATE mailbox_health SET blocks = greatest(blocks - (SELECT count(*) FROM messages
    WHERE reason = 'blocked' AND id IN (SELECT value FROM unnest(CAST(?1 AS bigint[])) AS value)), 0) WHERE mailbox = ?2;

-- name: mark_refused
UPDATE messages SET state = 'error', reason = 'refused', detail = ?
    WHERE state = 'failed' AND id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value) RETURNING id;

-- name: messages_by_id
SELECT m.id, m.state, m.reason, m.mailbox, m.enrollment_id, m.step, e.cadence, e.email
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value);

-- name: retry
-- (a message held by a paused cadence gets its own due time back: the claim holds it again while paused)
UPDATE messages SET due_at = coalesce(held_due, due_at), held_due = NULL,
    state = 'scheduled', reason = NULL, transient_failures = 0,
    detail = 'retried by the operator (was ' || coalesce(reason, 'error') || ')'
    WHERE state = 'error' AND id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value) RETURNING id;

-- name: enrollments_to_move
SELECT cadence, mailbox, count(*) FROM enrollments
    WHERE id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value) AND mailbox != ? GROUP BY cadence, mailbox;

-- name: move_enrollments
UPDATE enrollments SET mailbox = ? WHERE id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value);

-- name: move_messages
-- (a message held by a paused cadence gets its own due time back: the claim holds it again while paused)
UPDATE messages SET due_at = coalesce(held_due, due_at), held_due = NULL,
    mailbox = ?1, state = 'scheduled', reason = NULL, transient_failures = 0,
    detail = 'reassigned to ' || ?1 || ' (was ' || mailbox || ')'
    WHERE state IN ('scheduled', 'error') AND enrollment_id IN (SELECT value FROM unnest(CAST(?2 AS bigint[])) AS value)
    RETURNING id;

-- name: enrollments_of_message_ids
SELECT DISTINCT e.id, e.cadence, e.email, e.state
    FROM unnest(CAST(? AS text[])) AS j(value) JOIN messages m ON m.message_id = j.value
    JOIN enrollments e ON e.id = m.enrollment_id;

-- name: dsn_failed
UPDATE messages SET state = 'failed', reason = ?, detail = ?
    WHERE id IN (SELECT m.id FROM unnest(CAST(? AS text[])) AS j(value) JOIN messages m ON m.message_id = j.value)
    AND state = 'sent' AND enrollment_id IN (SELECT id FROM enrollments WHERE email = ?) RETURNING id;

-- name: cancel_messages_of_ids
UPDATE messages SET state = 'cancelled', detail = ?
    WHERE state IN ('scheduled', 'error') AND enrollment_id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value) RETURNING id;

-- name: end_enrollments_of_ids
UPDATE enrollments SET state = ?, ended_at = ?
    WHERE state = 'active' AND id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value);

-- name: count_day_bounces
INSERT INTO daily_counts (mailbox, day, sent, refused, bounces) VALUES (?1, ?2, 0, ?3, greatest(?4, 0))
    ON CONFLICT (mailbox, day) DO UPDATE SET refused = greatest(daily_counts.refused + ?3, 0),
    bounces = greatest(daily_counts.bounces + ?4, 0);

-- name: count_day_blocks
INSERT INTO daily_counts (mailbox, day, sent, refused, blocks) VALUES (?1, ?2, 0, ?3, greatest(?4, 0))
    ON CONFLICT (mailbox, day) DO UPDATE SET refused = greatest(daily_counts.refused + ?3, 0),
    blocks = greatest(daily_counts.blocks + ?4, 0);

-- name: staged_rows
SELECT line, email FROM pg_temp.import_rows ORDER BY n;

-- name: drop_staged_rows
DELETE FROM pg_temp.import_rows;

-- name: staged_rows_of_owner
SELECT line, email FROM pg_temp.import_rows WHERE owner = ? ORDER BY n;

-- name: drop_staged_rows_of_owner
DELETE FROM pg_temp.import_rows WHERE owner = ?;

-- name: enroll_staged_renumbered
INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at, seq)
    SELECT ? + w.i, ?, r.email, t.mailbox, r.owner, ?, r.fields, ?, ? + w.i
    FROM (SELECT n, grp, i, i AS k
          FROM (SELECT n, owner, '' AS grp, row_number() OVER (ORDER BY n) - 1 AS i
                FROM pg_temp.import_rows) AS numbered) AS w
    JOIN pg_temp.import_rows r ON r.n = w.n
    JOIN pg_temp.import_cycles c ON c.grp = w.grp
    JOIN pg_temp.import_turns t ON t.grp = w.grp AND t.turn = w.k % c.turns;

-- name: enroll_staged_by_owner
INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at, seq)
    SELECT ? + w.i, ?, r.email, t.mailbox, r.owner, ?, r.fields, ?, ? + w.i
    FROM (SELECT n, grp, i, row_number() OVER (PARTITION BY owner ORDER BY n) - 1 AS k
          FROM (SELECT n, owner, owner AS grp, row_number() OVER (ORDER BY n) - 1 AS i
                FROM pg_temp.import_rows) AS numbered) AS w
    JOIN pg_temp.import_rows r ON r.n = w.n
    JOIN pg_temp.import_cycles c ON c.grp = w.grp
    JOIN pg_temp.import_turns t ON t.grp = w.grp AND t.turn = w.k % c.turns;

-- name: create_import_rows
CREATE TEMP TABLE import_rows (n BIGSERIAL PRIMARY KEY, line BIGINT, email TEXT, owner TEXT, fields TEXT);

-- name: outbox
SELECT m.id, e.cadence, e.email, m.step, m.mailbox, m.state, m.reason, COALESCE(m.held_due, m.due_at),
    m.sent_at, m.message_id, m.attempts, m.smtp_code, m.detail, m.variant
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id;

-- name: outbox_scheduled
SELECT m.id, e.cadence, e.email, m.step, m.mailbox, m.state, m.reason, COALESCE(m.held_due, m.due_at),
    m.sent_at, m.message_id, m.attempts, m.smtp_code, m.detail, m.variant
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id;

-- name: outbox_by_state
SELECT m.id, e.cadence, e.email, m.step, m.mailbox, m.state, m.reason, COALESCE(m.held_due, m.due_at),
    m.sent_at, m.message_id, m.attempts, m.smtp_code, m.detail, m.variant
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id;

-- name: error_ids
SELECT id FROM messages WHERE state = 'error';

-- Leases: which daemon sends for which mailbox (several daemons on one database). In the server's time.
-- name: server_now
SELECT extract(epoch FROM clock_timestamp());

-- name: daemon_seen
INSERT INTO daemons VALUES (?, ?, ?, ?, ?) ON CONFLICT (node) DO UPDATE SET
    pid = excluded.pid, host = excluded.host, seen_at = excluded.seen_at,
    started_at = CASE WHEN ? = 1 THEN excluded.started_at ELSE daemons.started_at END;

-- name: forget_daemons
DELETE FROM daemons WHERE seen_at < ?;

-- name: live_daemons
SELECT count(*) FROM daemons WHERE seen_at >= ?;

-- name: let_go
DELETE FROM leases WHERE holder = ? AND (mailbox = ANY(CAST(? AS text[])) OR NOT mailbox = ANY(CAST(? AS text[])));

-- name: renew_leases
UPDATE leases SET expires_at = ? WHERE holder = ? RETURNING mailbox;

-- name: free_mailboxes
SELECT w.m FROM unnest(CAST(? AS text[])) AS w(m) LEFT JOIN leases l ON l.mailbox = w.m
    WHERE l.mailbox IS NULL OR l.expires_at < ? ORDER BY w.m LIMIT ?;

-- Taken only if still free or expired when the row is locked: two daemons taking one mailbox at once, the
-- second gets nothing (no global lock orders their rounds).
-- name: take_lease
INSERT INTO leases SELECT w.m, ?2, ?3 FROM unnest(CAST(?1 AS text[])) AS w(m) ON CONFLICT (mailbox)
    DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at WHERE leases.expires_at < ?4
    RETURNING mailbox;

-- name: orphaned_to_uncertain
UPDATE messages SET state = 'error', reason = 'uncertain', uncertain_at = ?,
    detail = 'found in sending when ' || ? || ' took the mailbox over: its daemon stopped mid-send'
    WHERE state = 'sending' AND mailbox = ANY(CAST(? AS text[])) RETURNING id;

-- Fencing, in the claim's transaction: the row is held FOR KEY SHARE until the claim commits, so a takeover
-- (which locks it FOR UPDATE first: lock_taken) or a release (a delete) waits for the claim, then finds its
-- message in `sending`. The holder's own renewal (an update of expires_at only) does not wait for its claims,
-- nor they for it: with FOR SHARE each renewal queued behind the claims in flight and every claim behind it.
-- name: holds_lease
SELECT 1 FROM leases WHERE mailbox = ? AND holder = ?
    AND expires_at > extract(epoch FROM clock_timestamp()) + ? FOR KEY SHARE;

-- The leases about to be taken over, locked as the fence requires: after the claims that hold them commit.
-- name: lock_taken
SELECT 1 FROM leases WHERE mailbox = ANY(CAST(? AS text[])) ORDER BY mailbox FOR UPDATE;

-- name: release_leases
DELETE FROM leases WHERE holder = ?;

-- name: release_daemon
DELETE FROM daemons WHERE node = ?;

-- name: leases
SELECT mailbox, holder, expires_at FROM leases;

-- name: daemons
SELECT node, pid, host, started_at, seen_at FROM daemons ORDER BY node;

-- The message a claim takes, as on SQLite (SPEC §4), locked as it is read: a row another transaction holds
-- (an operator's retry, a reassign) is passed over, never waited for, and one that changed meanwhile is read
-- again before it is taken. No global lock: two daemons claim for their own mailboxes side by side. A follow-up
-- comes with its thread (as `thread`: step, Message-ID and subject of the steps sent before): no read of its own.
-- name: next_due
SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
    m.attempts, m.transient_failures, e.mailbox,
    EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq,
        (SELECT json_agg(json_build_array(t.step, t.message_id, t.subject) ORDER BY t.step)
            FROM messages t WHERE t.enrollment_id = m.enrollment_id AND t.state = 'sent' AND t.step < m.step) AS thread
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ? AND m.state = 'scheduled' AND m.due_at <= ?
    ORDER BY m.due_at, m.id LIMIT 1 FOR UPDATE OF m SKIP LOCKED;

-- One statement, the second part run only when the first finds nothing (each through its index).
-- name: next_due_follow_up
SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
    m.attempts, m.transient_failures, e.mailbox,
    EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq,
        (SELECT json_agg(json_build_array(t.step, t.message_id, t.subject) ORDER BY t.step)
            FROM messages t WHERE t.enrollment_id = m.enrollment_id AND t.state = 'sent' AND t.step < m.step) AS thread
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ? AND m.state = 'scheduled' AND m.step > 1 AND m.due_at <= ?
    ORDER BY m.due_at, m.id LIMIT 1 FOR UPDATE OF m SKIP LOCKED;

-- name: next_due_follow_ups_first
SELECT * FROM (SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
        m.attempts, m.transient_failures, e.mailbox AS sticky,
        EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq,
        (SELECT json_agg(json_build_array(t.step, t.message_id, t.subject) ORDER BY t.step)
            FROM messages t WHERE t.enrollment_id = m.enrollment_id AND t.state = 'sent' AND t.step < m.step) AS thread
        FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
        WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step > 1 AND m.due_at <= ?2
        ORDER BY m.due_at, m.id LIMIT 1 FOR UPDATE OF m SKIP LOCKED) AS f
UNION ALL
SELECT * FROM (SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
        m.attempts, m.transient_failures, e.mailbox AS sticky,
        EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq,
        (SELECT json_agg(json_build_array(t.step, t.message_id, t.subject) ORDER BY t.step)
            FROM messages t WHERE t.enrollment_id = m.enrollment_id AND t.state = 'sent' AND t.step < m.step) AS thread
        FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
        WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step = 1 AND m.due_at <= ?2
        ORDER BY m.due_at, m.id LIMIT 1 FOR UPDATE OF m SKIP LOCKED) AS n
LIMIT 1;

-- name: next_due_new_first
SELECT * FROM (SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
        m.attempts, m.transient_failures, e.mailbox AS sticky,
        EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq,
        (SELECT json_agg(json_build_array(t.step, t.message_id, t.subject) ORDER BY t.step)
            FROM messages t WHERE t.enrollment_id = m.enrollment_id AND t.state = 'sent' AND t.step < m.step) AS thread
        FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
        WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step = 1 AND m.due_at <= ?2
        ORDER BY m.due_at, m.id LIMIT 1 FOR UPDATE OF m SKIP LOCKED) AS n
UNION ALL
SELECT * FROM (SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
        m.attempts, m.transient_failures, e.mailbox AS sticky,
        EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq,
        (SELECT json_agg(json_build_array(t.step, t.message_id, t.subject) ORDER BY t.step)
            FROM messages t WHERE t.enrollment_id = m.enrollment_id AND t.state = 'sent' AND t.step < m.step) AS thread
        FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
        WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step > 1 AND m.due_at <= ?2
        ORDER BY m.due_at, m.id LIMIT 1 FOR UPDATE OF m SKIP LOCKED) AS f
LIMIT 1;

-- name: log_end_of_ids
INSERT INTO enrollment_events (enrollment_id, at, kind, detail)
    SELECT id, ?, ?, ? FROM enrollments WHERE state = 'active' AND id IN (SELECT value FROM unnest(CAST(? AS bigint[])) AS value);

-- `check`: active enrollments of a cadence a template's required field is missing or empty in (one pass each)
-- name: lacking_field
SELECT count(*), min(email) FROM enrollments
    WHERE cadence = ? AND state = 'active' AND coalesce(CAST(fields AS json) ->> ?, '') = '';

-- An import's enrollments, counted on the node's row of the cadence (see enrollment_counts in the schema).
-- name: count_enrolled
INSERT INTO enrollment_counts VALUES (?, 'active', ?, counting_node())
    ON CONFLICT (cadence, state, node) DO UPDATE SET n = enrollment_counts.n + excluded.n;

-- The claim, counted in the statement on a session whose counting triggers stand aside (see mark_sent_counted):
-- the message was read scheduled, and locked, in this transaction.
-- name: claim_counted
WITH claimed AS (
    UPDATE messages SET state = 'sending', attempts = ?1, message_id = ?2, reason = NULL, detail = NULL
        WHERE id = ?3 RETURNING mailbox
)
INSERT INTO message_counts SELECT c.mailbox, k.state, k.n
    FROM claimed c, (VALUES ('scheduled', -1), ('sending', 1)) k (state, n)
    WHERE current_setting('cadenced.counting', true) = 'statement'
    ON CONFLICT (mailbox, state) DO UPDATE SET n = message_counts.n + excluded.n;

-- A send's record in one statement, counted once: the message sent, and only if it was not already (a record
-- written again after a commit whose answer was lost counts nothing twice), the mailbox's day (?9: 1 for a first
-- email, which new_per_day counts apart), the recipient's domain (?11, domain_daily_limit) and the cadence's first
-- emails (?12, its new_per_day); its last send and gap noted; ?13: the enrollment, at its last step, finished.
-- (mark_sent, count_send or count_first_send, count_domain_send, count_cadence_first, note_send and
-- finish_enrollment, in one round trip.) On a session whose counting triggers stand aside (`cadenced.counting`,
-- the group commit's) it also counts what they would: the message by state, the send's result (?14: the
-- cadence, ?15: the step) and the enrollment's, their rollups, and the enrollment by state.
-- name: mark_sent_counted
WITH by_statement AS (
    SELECT 1 WHERE current_setting('cadenced.counting', true) = 'statement'
), was AS (
    SELECT id, state, mailbox FROM messages WHERE id = ?6 AND state <> 'sent' FOR UPDATE
), sent AS (
    UPDATE messages m SET state = 'sent', sent_at = ?1, smtp_code = ?2, detail = ?3, subject = ?4, variant = ?5
        FROM was WHERE m.id = was.id RETURNING was.state, was.mailbox
), uncounted AS (
    UPDATE message_counts c SET n = c.n - 1 FROM sent, by_statement
        WHERE c.mailbox = sent.mailbox AND c.state = sent.state
), finished AS (
    UPDATE enrollments SET state = 'finished', ended_at = ?1 WHERE id = ?13 AND state = 'active' RETURNING cadence
), ended AS (
    INSERT INTO enrollment_counts SELECT f.cadence, k.state, k.n, counting_node()
        FROM finished f, by_statement, (VALUES ('active', -1), ('finished', 1)) k (state, n)
        ON CONFLICT (cadence, state, node) DO UPDATE SET n = enrollment_counts.n + excluded.n
), result AS (
    SELECT CAST(?14 AS TEXT) AS cadence, result_day(?1) AS day, CAST(?15 AS INTEGER) AS step,
        coalesce(?5, '') AS variant, sent.mailbox, 'sent' AS kind FROM sent, by_statement
    UNION ALL SELECT f.cadence, result_day(?1), CAST(?15 AS INTEGER), coalesce(?5, ''), ?7, 'finished'
        FROM finished f, by_statement
), results_counted AS (
    INSERT INTO results SELECT cadence, day, step, variant, mailbox, kind, 1 FROM result
        ON CONFLICT (cadence, day, step, variant, mailbox, kind) DO UPDATE SET n = results.n + 1
), totals_counted AS (
    INSERT INTO result_totals SELECT cadence, step, variant, mailbox, kind, 1 FROM result
        ON CONFLICT (cadence, step, variant, mailbox, kind) DO UPDATE SET n = result_totals.n + 1
), days_counted AS (
    INSERT INTO result_days SELECT cadence, day, step, kind, 1, counting_node() FROM result
        ON CONFLICT (cadence, day, step, kind, node) DO UPDATE SET n = result_days.n + 1
), counted AS (
    INSERT INTO daily_counts (mailbox, day, sent, first_emails) SELECT ?7, ?8, 1, ?9 FROM sent
        ON CONFLICT (mailbox, day) DO UPDATE SET sent = daily_counts.sent + 1,
        first_emails = daily_counts.first_emails + excluded.first_emails
), by_domain AS (
    INSERT INTO domain_counts (mailbox, day, domain, sent) SELECT ?7, ?8, CAST(?11 AS TEXT), 1 FROM sent
        WHERE CAST(?11 AS TEXT) IS NOT NULL
        ON CONFLICT (mailbox, day, domain) DO UPDATE SET sent = domain_counts.sent + 1
), by_cadence AS (
    INSERT INTO cadence_counts (mailbox, cadence, day, first_emails) SELECT ?7, CAST(?12 AS TEXT), ?8, 1 FROM sent
        WHERE CAST(?12 AS TEXT) IS NOT NULL
        ON CONFLICT (mailbox, cadence, day) DO UPDATE SET first_emails = cadence_counts.first_emails + 1
)
INSERT INTO mailbox_health (mailbox, state, since, last_send_at, not_before) VALUES (?7, 'connected', ?1, ?1, ?10)
    ON CONFLICT (mailbox) DO UPDATE SET last_send_at = excluded.last_send_at,
    not_before = excluded.not_before, throttled_until = NULL;

-- schedule_step and its count in one statement, so that the send's record waits for no answer (a pipeline).
-- name: schedule_step_counted
WITH scheduled AS (
    INSERT INTO messages (enrollment_id, step, mailbox, state, due_at)
        SELECT id, ?, ?, 'scheduled', ? FROM enrollments WHERE id = ? AND state = 'active'
        ON CONFLICT (enrollment_id, step) DO NOTHING RETURNING mailbox
)
INSERT INTO message_counts SELECT mailbox, 'scheduled', count(*) FROM scheduled GROUP BY mailbox
    ON CONFLICT (mailbox, state) DO UPDATE SET n = message_counts.n + excluded.n;

-- A turn's reads in one statement (the group commit's, fenced): its lease held (holds_lease), its snapshot and,
-- when it may claim, the row its claim would take (next_due in its order), each run as written under its name.
-- Each statement costs the server and psycopg their own work beyond what it runs: one statement, not three.
-- name: ask_lease_snapshot
-- compose: holds_lease snapshot

-- name: ask_lease_snapshot_next_due
-- compose: holds_lease snapshot next_due

-- name: ask_lease_snapshot_next_due_follow_up
-- compose: holds_lease snapshot next_due_follow_up

-- name: ask_lease_snapshot_next_due_follow_ups_first
-- compose: holds_lease snapshot next_due_follow_ups_first

-- name: ask_lease_snapshot_next_due_new_first
-- compose: holds_lease snapshot next_due_new_first
