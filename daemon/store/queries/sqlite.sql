-- The statements SQLite says its own way: its temp database for an import's scratch tables, lists as JSON
-- (json_each), two-argument max(), and the index a statement must take (INDEXED BY).

-- name: drop_import_rows
DROP TABLE IF EXISTS temp.import_rows;

-- name: stage_import
INSERT INTO temp.import_rows (line, email, owner, fields) VALUES (?, ?, ?, ?);

-- name: index_staged_by_email
CREATE INDEX temp.import_by_email ON import_rows (email, line);

-- name: staged_duplicates
SELECT r.n, r.line, r.email, d.first
    FROM (SELECT email, min(line) AS first FROM temp.import_rows GROUP BY email HAVING count(*) > 1) AS d
    JOIN temp.import_rows r ON r.email = d.email AND r.line > d.first;

-- name: drop_staged_row
DELETE FROM temp.import_rows WHERE n = ?;

-- name: staged_suppressed
SELECT i.n, i.line, i.email, s.reason FROM temp.import_rows i JOIN suppressions s ON s.email = i.email;

-- name: drop_staged_enrolled
DELETE FROM temp.import_rows AS i
    WHERE EXISTS (SELECT 1 FROM enrollments e WHERE e.email = i.email AND e.cadence = ?);

-- name: staged_by_owner
SELECT owner, count(*) FROM temp.import_rows GROUP BY owner;

-- name: staged_count
SELECT count(*) FROM temp.import_rows;

-- name: staged
SELECT line, email, owner, fields FROM temp.import_rows ORDER BY n;

-- name: drop_import_turns
DROP TABLE IF EXISTS temp.import_turns;

-- name: drop_import_cycles
DROP TABLE IF EXISTS temp.import_cycles;

-- name: insert_import_cycles
INSERT INTO temp.import_cycles VALUES (?, ?);

-- name: insert_import_turns
INSERT INTO temp.import_turns VALUES (?, ?, ?);

-- name: staged_span
SELECT count(*), coalesce(max(n), 0) FROM temp.import_rows;

-- name: drop_import_cycle
DROP TABLE IF EXISTS temp.import_cycle;

-- name: insert_import_cycle
INSERT INTO temp.import_cycle VALUES (?, ?);

-- name: enroll_staged_in_order
INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at, seq)
    SELECT ?1 + r.n - 1, ?2, r.email,
    (SELECT c.mailbox FROM temp.import_cycle c WHERE c.turn = (r.n - 1) % ?5),
    r.owner, ?3, r.fields, ?4, ?6 + r.n - 1
    FROM temp.import_rows r ORDER BY r.n;

-- name: sent_on_days
SELECT d.mailbox, d.sent FROM json_each(?) j
    JOIN daily_counts d ON d.mailbox = json_extract(j.value, '$[0]')
    AND d.day = json_extract(j.value, '$[1]');

-- name: first_send_days
SELECT j.value, (SELECT min(day) FROM daily_counts WHERE mailbox = j.value AND sent > 0)
    FROM json_each(?) j;

-- name: failed_kinds
SELECT reason, count(*) FROM messages WHERE state = 'failed' AND reason IN ('bounced', 'blocked')
    AND id IN (SELECT value FROM json_each(?)) GROUP BY reason;

-- name: restore_cancelled
-- (a message held by a paused cadence gets its own due time back: the claim holds it again while paused)
UPDATE messages SET due_at = coalesce(held_due, due_at), held_due = NULL,
    state = 'scheduled', detail = 'restored: the refusal was the sender''s'
    WHERE state = 'cancelled' AND detail IN
    (SELECT ?2 || ' ' || value FROM json_each(?1) UNION SELECT ?3 || ' ' || value FROM json_each(?1))
    RETURNING enrollment_id;

-- name: unsuppress_messages
DELETE FROM suppressions WHERE message IN (SELECT value FROM json_each(?));

-- name: enrollments_of_messages
SELECT enrollment_id FROM messages WHERE id IN (SELECT value FROM json_each(?));

-- name: reactivate_enrollments
UPDATE enrollments SET state = 'active', ended_at = NULL
    WHERE state IN ('bounced', 'stopped') AND id IN (SELECT value FROM json_each(?));

-- name: unblock
UPDATE mailbox_health SET blocks = max(blocks - (SELECT count(*) FROM messages
    WHERE reason = 'blocked' AND id IN (SELECT value FROM json_each(?1))), 0) WHERE mailbox = ?2;

-- name: mark_refused
UPDATE messages SET state = 'error', reason = 'refused', detail = ?
    WHERE state = 'failed' AND id IN (SELECT value FROM json_each(?)) RETURNING id;

-- name: messages_by_id
SELECT m.id, m.state, m.reason, m.mailbox, m.enrollment_id, m.step, e.cadence, e.email
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.id IN (SELECT value FROM json_each(?));

-- name: retry
-- (a message held by a paused cadence gets its own due time back: the claim holds it again while paused)
UPDATE messages SET due_at = coalesce(held_due, due_at), held_due = NULL,
    state = 'scheduled', reason = NULL, transient_failures = 0,
    detail = 'retried by the operator (was ' || coalesce(reason, 'error') || ')'
    WHERE state = 'error' AND id IN (SELECT value FROM json_each(?)) RETURNING id;

-- name: enrollments_to_move
SELECT cadence, mailbox, count(*) FROM enrollments
    WHERE id IN (SELECT value FROM json_each(?)) AND mailbox != ? GROUP BY cadence, mailbox;

-- name: move_enrollments
UPDATE enrollments SET mailbox = ? WHERE id IN (SELECT value FROM json_each(?));

-- name: move_messages
-- (a message held by a paused cadence gets its own due time back: the claim holds it again while paused)
UPDATE messages SET due_at = coalesce(held_due, due_at), held_due = NULL,
    mailbox = ?1, state = 'scheduled', reason = NULL, transient_failures = 0,
    detail = 'reassigned to ' || ?1 || ' (was ' || mailbox || ')'
    WHERE state IN ('scheduled', 'error') AND enrollment_id IN (SELECT value FROM json_each(?2))
    RETURNING id;

-- name: enrollments_of_message_ids
SELECT DISTINCT e.id, e.cadence, e.email, e.state
    FROM json_each(?) j CROSS JOIN messages m ON m.message_id = j.value
    JOIN enrollments e ON e.id = m.enrollment_id;

-- name: dsn_failed
UPDATE messages SET state = 'failed', reason = ?, detail = ?
    WHERE id IN (SELECT m.id FROM json_each(?) j CROSS JOIN messages m ON m.message_id = j.value)
    AND state = 'sent' AND enrollment_id IN (SELECT id FROM enrollments WHERE email = ?) RETURNING id;

-- name: cancel_messages_of_ids
UPDATE messages SET state = 'cancelled', detail = ?
    WHERE state IN ('scheduled', 'error') AND enrollment_id IN (SELECT value FROM json_each(?)) RETURNING id;

-- name: end_enrollments_of_ids
UPDATE enrollments SET state = ?, ended_at = ?
    WHERE state = 'active' AND id IN (SELECT value FROM json_each(?));

-- name: count_day_bounces
INSERT INTO daily_counts (mailbox, day, sent, refused, bounces) VALUES (?1, ?2, 0, ?3, max(?4, 0))
    ON CONFLICT (mailbox, day) DO UPDATE SET refused = max(daily_counts.refused + ?3, 0),
    bounces = max(daily_counts.bounces + ?4, 0);

-- name: count_day_blocks
INSERT INTO daily_counts (mailbox, day, sent, refused, blocks) VALUES (?1, ?2, 0, ?3, max(?4, 0))
    ON CONFLICT (mailbox, day) DO UPDATE SET refused = max(daily_counts.refused + ?3, 0),
    blocks = max(daily_counts.blocks + ?4, 0);

-- name: staged_rows
SELECT line, email FROM temp.import_rows ORDER BY n;

-- name: drop_staged_rows
DELETE FROM temp.import_rows;

-- name: staged_rows_of_owner
SELECT line, email FROM temp.import_rows WHERE owner = ? ORDER BY n;

-- name: drop_staged_rows_of_owner
DELETE FROM temp.import_rows WHERE owner = ?;

-- name: enroll_staged_renumbered
INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at, seq)
    SELECT ? + w.i, ?, r.email, t.mailbox, r.owner, ?, r.fields, ?, ? + w.i
    FROM (SELECT n, grp, i, i AS k
          FROM (SELECT n, owner, '' AS grp, row_number() OVER (ORDER BY n) - 1 AS i
                FROM temp.import_rows) AS numbered) AS w
    JOIN temp.import_rows r ON r.n = w.n
    JOIN temp.import_cycles c ON c.grp = w.grp
    JOIN temp.import_turns t ON t.grp = w.grp AND t.turn = w.k % c.turns;

-- name: enroll_staged_by_owner
INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at, seq)
    SELECT ? + w.i, ?, r.email, t.mailbox, r.owner, ?, r.fields, ?, ? + w.i
    FROM (SELECT n, grp, i, row_number() OVER (PARTITION BY owner ORDER BY n) - 1 AS k
          FROM (SELECT n, owner, owner AS grp, row_number() OVER (ORDER BY n) - 1 AS i
                FROM temp.import_rows) AS numbered) AS w
    JOIN temp.import_rows r ON r.n = w.n
    JOIN temp.import_cycles c ON c.grp = w.grp
    JOIN temp.import_turns t ON t.grp = w.grp AND t.turn = w.k % c.turns;

-- name: create_import_rows
CREATE TEMP TABLE import_rows (n INTEGER PRIMARY KEY, line INTEGER, email TEXT, owner TEXT, fields TEXT);

-- The outbox by state, always through its index: with ANALYZE statistics (a state is a quarter of 20,000,000
-- rows on average) SQLite would rather scan every message in id order than sort the few in error. The
-- conditions (`m.state = '…'` written out, the mailbox, the cadence) follow.
-- name: outbox
SELECT m.id, e.cadence, e.email, m.step, m.mailbox, m.state, m.reason, COALESCE(m.held_due, m.due_at),
    m.sent_at, m.message_id, m.attempts, m.smtp_code, m.detail, m.variant
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id;

-- name: outbox_scheduled
SELECT m.id, e.cadence, e.email, m.step, m.mailbox, m.state, m.reason, COALESCE(m.held_due, m.due_at),
    m.sent_at, m.message_id, m.attempts, m.smtp_code, m.detail, m.variant
    FROM messages m INDEXED BY messages_due JOIN enrollments e ON e.id = m.enrollment_id;

-- name: outbox_by_state
SELECT m.id, e.cadence, e.email, m.step, m.mailbox, m.state, m.reason, COALESCE(m.held_due, m.due_at),
    m.sent_at, m.message_id, m.attempts, m.smtp_code, m.detail, m.variant
    FROM messages m INDEXED BY messages_state JOIN enrollments e ON e.id = m.enrollment_id;

-- name: error_ids
SELECT id FROM messages INDEXED BY messages_state WHERE state = 'error';

-- The message a claim takes: the oldest due (prioritize = "due"), or the oldest due follow-up (step >= 2,
-- through its own index) before the oldest due first email, or the other way round (SPEC §4).
-- name: next_due
SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
    m.attempts, m.transient_failures, e.mailbox,
    EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ? AND m.state = 'scheduled' AND m.due_at <= ?
    ORDER BY m.due_at, m.id LIMIT 1;

-- One statement, the second part run only when the first finds nothing (each through its index).
-- name: next_due_follow_up
SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
    m.attempts, m.transient_failures, e.mailbox,
    EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ? AND m.state = 'scheduled' AND m.step > 1 AND m.due_at <= ?
    ORDER BY m.due_at, m.id LIMIT 1;

-- name: next_due_follow_ups_first
SELECT * FROM (SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
        m.attempts, m.transient_failures, e.mailbox AS sticky,
        EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq
        FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
        WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step > 1 AND m.due_at <= ?2
        ORDER BY m.due_at, m.id LIMIT 1) AS f
UNION ALL
SELECT * FROM (SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
        m.attempts, m.transient_failures, e.mailbox AS sticky,
        EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq
        FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
        WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step = 1 AND m.due_at <= ?2
        ORDER BY m.due_at, m.id LIMIT 1) AS n
LIMIT 1;

-- name: next_due_new_first
SELECT * FROM (SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
        m.attempts, m.transient_failures, e.mailbox AS sticky,
        EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq
        FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
        WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step = 1 AND m.due_at <= ?2
        ORDER BY m.due_at, m.id LIMIT 1) AS n
UNION ALL
SELECT * FROM (SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
        m.attempts, m.transient_failures, e.mailbox AS sticky,
        EXISTS (SELECT 1 FROM cadence_pauses p WHERE p.cadence = e.cadence) AS held,
        coalesce(e.seq, e.id) AS seq
        FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
        WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step > 1 AND m.due_at <= ?2
        ORDER BY m.due_at, m.id LIMIT 1) AS f
LIMIT 1;

-- name: log_end_of_ids
INSERT INTO enrollment_events (enrollment_id, at, kind, detail)
    SELECT id, ?, ?, ? FROM enrollments WHERE state = 'active' AND id IN (SELECT value FROM json_each(?));

-- `check`: active enrollments of a cadence a template's required field is missing or empty in (one pass each)
-- name: lacking_field
SELECT count(*), min(email) FROM enrollments
    WHERE cadence = ? AND state = 'active' AND coalesce(json_extract(fields, '$."' || ? || '"'), '') = '';

-- A cadence's counts (and its results per day) by hand, in the group commit: rows keyed without PostgreSQL's
-- node, as one daemon writes SQLite.
-- name: count_enrolled
INSERT INTO enrollment_counts VALUES (?, 'active', ?)
    ON CONFLICT (cadence, state) DO UPDATE SET n = enrollment_counts.n + excluded.n;

-- name: count_result_day
INSERT INTO result_days VALUES (?1, ?2, ?3, ?6, ?7)
    ON CONFLICT (cadence, day, step, kind) DO UPDATE SET n = result_days.n + excluded.n;

-- name: uncount_active
UPDATE enrollment_counts SET n = n - 1 WHERE cadence = ? AND state = 'active';

-- name: count_finished
INSERT INTO enrollment_counts VALUES (?, 'finished', 1)
    ON CONFLICT (cadence, state) DO UPDATE SET n = n + 1;
