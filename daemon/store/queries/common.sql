-- The store's statements both engines run as written (SQLite's `?` placeholders; PostgreSQL's loader
-- writes them as psycopg's once, at load). Each is found by the name on the line before it.

-- name: daemon_state
SELECT key, value FROM daemon_state;

-- name: set_daemon_state
INSERT INTO daemon_state VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: pins
SELECT p.cadence, p.auto_rotate, p.rotate_among,
    (SELECT coalesce(sum(n), 0) FROM enrollment_counts c WHERE c.cadence = p.cadence)
    FROM cadence_pins p;

-- name: pin
INSERT INTO cadence_pins VALUES (?, ?, ?, ?) ON CONFLICT (cadence) DO NOTHING;

-- name: make_unsubscribe_key
INSERT INTO daemon_state VALUES ('unsubscribe_key', ?) ON CONFLICT (key) DO NOTHING;

-- name: unsubscribe_key
SELECT value FROM daemon_state WHERE key = 'unsubscribe_key';

-- name: api_answer
SELECT playbook, digest, answer FROM api_requests WHERE key = ?;

-- name: forget_api_answers
DELETE FROM api_requests WHERE created_at < ?;

-- name: keep_api_answer
INSERT INTO api_requests VALUES (?, ?, ?, ?, ?);

-- name: email_of
SELECT email FROM enrollments WHERE id = ?;

-- name: unsuppress
DELETE FROM suppressions WHERE email = ? RETURNING email;

-- name: suppress
INSERT INTO suppressions (email, reason, created_at) VALUES (?, ?, ?) ON CONFLICT (email) DO NOTHING;


-- name: rotation_counts
SELECT mailbox, enrollments FROM rotation_counts WHERE cadence = ?;

-- name: rotation_cursors
SELECT grp, last FROM rotation_cursors WHERE cadence = ?;

-- name: rotation_credits
SELECT grp, mailbox, credit FROM rotation_credits WHERE cadence = ?;

-- name: save_rotation_cursor
INSERT INTO rotation_cursors VALUES (?, ?, ?)
    ON CONFLICT (cadence, grp) DO UPDATE SET last = excluded.last;

-- name: save_rotation_credit
INSERT INTO rotation_credits VALUES (?, ?, ?, ?)
    ON CONFLICT (cadence, grp, mailbox) DO UPDATE SET credit = excluded.credit;

-- name: count_enrollments
INSERT INTO rotation_counts VALUES (?, ?, ?) ON CONFLICT (cadence, mailbox)
    DO UPDATE SET enrollments = rotation_counts.enrollments + excluded.enrollments;

-- name: next_enrollment_id
SELECT coalesce(max(id), 0) FROM enrollments;

-- name: insert_enrollments
INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at, seq)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: create_import_cycles
CREATE TEMP TABLE import_cycles (grp TEXT PRIMARY KEY, turns INTEGER);

-- name: create_import_turns
CREATE TEMP TABLE import_turns (grp TEXT, turn INTEGER, mailbox TEXT, PRIMARY KEY (grp, turn));

-- name: create_import_cycle
CREATE TEMP TABLE import_cycle (turn INTEGER PRIMARY KEY, mailbox TEXT);

-- name: enrolled_in
SELECT coalesce(sum(n), 0) FROM enrollment_counts WHERE cadence = ?;

-- name: count_result
INSERT INTO results VALUES (?, ?, 0, '', ?, ?, ?)
    ON CONFLICT (cadence, day, step, variant, mailbox, kind) DO UPDATE SET n = results.n + excluded.n;

-- The group commit's sends and ends, counted by hand (SQLite's other connections count by their TEMP triggers).
-- name: count_result_row
INSERT INTO results VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT (cadence, day, step, variant, mailbox, kind) DO UPDATE SET n = results.n + excluded.n;

-- name: count_result_total
INSERT INTO result_totals VALUES (?1, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT (cadence, step, variant, mailbox, kind) DO UPDATE SET n = result_totals.n + excluded.n;

-- name: schedule_first_steps
INSERT INTO messages (enrollment_id, step, mailbox, state, due_at)
    SELECT id, 1, coalesce(?, mailbox), 'scheduled', ? FROM enrollments WHERE id >= ? ORDER BY id;

-- name: mailbox_states
SELECT mailbox, state, paused_reason FROM mailbox_health;

-- name: set_mailbox_state
INSERT INTO mailbox_health (mailbox, state, reason, since) VALUES (?, ?, ?, ?)
    ON CONFLICT (mailbox) DO UPDATE SET state = excluded.state, reason = excluded.reason,
    since = excluded.since;

-- name: health
SELECT * FROM mailbox_health;

-- name: message_counts
SELECT mailbox, state, n FROM message_counts WHERE n > 0;

-- name: uncount_message
UPDATE message_counts SET n = n - 1 WHERE mailbox = ? AND state = ?;

-- name: count_message
INSERT INTO message_counts VALUES (?, ?, 1) ON CONFLICT (mailbox, state) DO UPDATE SET n = n + 1;

-- name: count_scheduled
INSERT INTO message_counts VALUES (?, 'scheduled', ?)
    ON CONFLICT (mailbox, state) DO UPDATE SET n = message_counts.n + excluded.n;

-- name: sent_on
SELECT sent FROM daily_counts WHERE mailbox = ? AND day = ?;

-- name: enrollment_counts
SELECT cadence, state, sum(n) FROM enrollment_counts GROUP BY cadence, state HAVING sum(n) > 0;

-- name: earliest_due
SELECT min(due_at) FROM messages WHERE mailbox = ? AND state = 'scheduled';

-- name: recover_sending
UPDATE messages SET state = 'error', reason = 'uncertain', uncertain_at = ?,
    detail = 'found in sending at start-up: the daemon stopped mid-transaction'
    WHERE state = 'sending' RETURNING id;

-- A day's sends include its uncertain ones (?3: the local day's start): they may have been delivered.
-- name: snapshot
SELECT (SELECT min(due_at) FROM messages WHERE mailbox = ?1 AND state = 'scheduled'),
    coalesce((SELECT sent FROM daily_counts WHERE mailbox = ?1 AND day = ?2), 0) + (SELECT count(*) FROM messages
        WHERE mailbox = ?1 AND state = 'error' AND reason = 'uncertain' AND uncertain_at >= ?3),
    h.not_before, coalesce(h.state, 'connected'), h.quota_day, h.limit_logged_day,
    h.next_probe_at, h.failures, h.throttled_until,
    (SELECT min(day) FROM daily_counts WHERE mailbox = ?1 AND sent > 0), h.paused_reason, h.since
    FROM (SELECT 1) AS one LEFT JOIN mailbox_health h ON h.mailbox = ?1;

-- name: uncertain_since
SELECT count(*) FROM messages WHERE mailbox = ? AND state = 'error' AND reason = 'uncertain' AND uncertain_at >= ?;

-- name: first_send_day
SELECT min(day) FROM daily_counts WHERE mailbox = ? AND sent > 0;

-- name: reputation
SELECT coalesce(sum(sent + refused), 0), coalesce(sum(bounces), 0), coalesce(sum(blocks), 0)
    FROM daily_counts WHERE mailbox = ? AND day >= ?;

-- name: health_row
INSERT INTO mailbox_health (mailbox, state, since) VALUES (?, 'connected', ?) ON CONFLICT DO NOTHING;

-- name: pause
UPDATE mailbox_health SET paused_reason = ? WHERE mailbox = ? AND paused_reason IS NULL RETURNING 1;

-- name: paused_reason
SELECT paused_reason FROM mailbox_health WHERE mailbox = ? AND paused_reason IS NOT NULL;

-- name: resume
UPDATE mailbox_health SET paused_reason = NULL WHERE mailbox = ?;

-- name: forget_failures
UPDATE daily_counts SET bounces = 0, blocks = 0 WHERE mailbox = ?;

-- name: forget_pause_details
UPDATE messages SET detail = NULL WHERE mailbox = ? AND state = 'scheduled'
    AND detail LIKE 'deferred: paused (%';

-- name: domain_counts_on
SELECT day, domain, sent FROM domain_counts WHERE mailbox = ? AND day = ?;

-- name: domain_sent
SELECT sent FROM domain_counts WHERE mailbox = ? AND day = ? AND domain = ?;

-- name: defer_domain
UPDATE messages SET due_at = ?1 + (due_at - ?5) / 1e6, detail = ?2 WHERE id IN (
    SELECT m.id FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ?3 AND m.state = 'scheduled' AND m.due_at <= ?5
    AND substr(e.email, instr(e.email, '@') + 1) = ?4)
    RETURNING id;

-- [[cadences]] new_per_day: a cadence's first emails of the day sent by a mailbox; the others due wait for the
-- next sending day, in their order, as a full domain's do.
-- name: cadence_first_emails
SELECT first_emails FROM cadence_counts WHERE mailbox = ? AND cadence = ? AND day = ?;

-- name: count_cadence_first
INSERT INTO cadence_counts VALUES (?, ?, ?, 1)
    ON CONFLICT (mailbox, cadence, day) DO UPDATE SET first_emails = cadence_counts.first_emails + 1;

-- name: defer_cadence_new
UPDATE messages SET due_at = ?1 + (due_at - ?5) / 1e6, detail = ?2 WHERE id IN (
    SELECT m.id FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ?3 AND m.state = 'scheduled' AND m.step = 1 AND m.due_at <= ?5 AND e.cadence = ?4)
    RETURNING id;

-- plan: what is scheduled, in due order, one kind at a time (follow-ups through their own index)
-- name: scheduled_follow_ups_in_order
SELECT due_at, step, enrollment_id, id FROM messages
    WHERE mailbox = ? AND state = 'scheduled' AND step > 1 AND due_at < ? ORDER BY due_at, id;

-- name: scheduled_new_in_order
SELECT due_at, step, enrollment_id, id FROM messages
    WHERE mailbox = ? AND state = 'scheduled' AND step = 1 AND due_at < ? ORDER BY due_at, id;

-- plan's backlog past its horizon: from where it stopped reading (?2 due, ?3 id) to the horizon (?4).
-- name: left_follow_ups_in_order
SELECT e.cadence, count(*) FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step > 1 AND m.due_at < ?4
    AND (m.due_at > ?2 OR (m.due_at = ?2 AND m.id >= ?3)) GROUP BY e.cadence;

-- name: left_new_in_order
SELECT e.cadence, count(*) FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.step = 1 AND m.due_at < ?4
    AND (m.due_at > ?2 OR (m.due_at = ?2 AND m.id >= ?3)) GROUP BY e.cadence;

-- name: claim
UPDATE messages SET state = 'sending', attempts = ?, message_id = ?, reason = NULL, detail = NULL
    WHERE id = ?;

-- name: thread
SELECT step, message_id, subject FROM messages
    WHERE enrollment_id = ? AND state = 'sent' AND step < ? ORDER BY step;

-- name: count_domain_send
INSERT INTO domain_counts VALUES (?, ?, ?, 1)
    ON CONFLICT (mailbox, day, domain) DO UPDATE SET sent = domain_counts.sent + 1;

-- name: keep_sent_copy
INSERT INTO sent_copies (message, mailbox, message_id, content) VALUES (?, ?, ?, ?)
    ON CONFLICT DO NOTHING;

-- name: state_of_message
SELECT mailbox, state FROM messages WHERE id = ?;

-- name: mark_sent
UPDATE messages SET state = 'sent', sent_at = ?, smtp_code = ?, detail = ?, subject = ?, variant = ?
    WHERE id = ?;

-- name: count_send
INSERT INTO daily_counts (mailbox, day, sent) VALUES (?, ?, 1)
    ON CONFLICT (mailbox, day) DO UPDATE SET sent = daily_counts.sent + 1;

-- A first email (step 1): new_per_day counts them apart.
-- name: count_first_send
INSERT INTO daily_counts (mailbox, day, sent, first_emails) VALUES (?, ?, 1, 1)
    ON CONFLICT (mailbox, day) DO UPDATE SET sent = daily_counts.sent + 1,
    first_emails = daily_counts.first_emails + 1;

-- new_per_day: the first emails of the day, and the mailbox's oldest follow-up (through its index)
-- status: the oldest scheduled follow-up and first email of a mailbox (kind 2, kind 1), in the claim's order.
-- name: oldest_of_kinds
SELECT * FROM (SELECT 2 AS kind, due_at, id FROM messages WHERE mailbox = ?1 AND state = 'scheduled' AND step > 1
    ORDER BY due_at, id LIMIT 1) AS f
UNION ALL
SELECT * FROM (SELECT 1 AS kind, due_at, id FROM messages WHERE mailbox = ?1 AND state = 'scheduled' AND step = 1
    ORDER BY due_at, id LIMIT 1) AS n;

-- name: new_per_day_state
SELECT (SELECT first_emails FROM daily_counts WHERE mailbox = ?1 AND day = ?2),
    (SELECT min(due_at) FROM messages WHERE mailbox = ?1 AND state = 'scheduled' AND step > 1);

-- name: note_send
INSERT INTO mailbox_health (mailbox, state, since, last_send_at, not_before)
    VALUES (?, 'connected', ?, ?, ?)
    ON CONFLICT (mailbox) DO UPDATE SET last_send_at = excluded.last_send_at,
    not_before = excluded.not_before, throttled_until = NULL;

-- name: sent_copies_due
SELECT message, message_id, content FROM sent_copies WHERE mailbox = ? ORDER BY message LIMIT ?;

-- name: copy_filed
DELETE FROM sent_copies WHERE message = ?;

-- name: copy_failed
UPDATE sent_copies SET attempts = attempts + 1, detail = ? WHERE message = ?;

-- A claim given up before the end of DATA (its lease ran out): nothing was delivered. Only this attempt, and
-- only while `sending` or made uncertain by the takeover that followed.
-- name: release_claim
UPDATE messages SET state = 'scheduled', reason = NULL, uncertain_at = NULL, detail = ?
    WHERE id = ? AND attempts = ? AND (state = 'sending' OR (state = 'error' AND reason = 'uncertain'));

-- name: reschedule
UPDATE messages SET state = 'scheduled', due_at = ?, smtp_code = ?, detail = ?,
    transient_failures = transient_failures + ? WHERE id = ?;

-- name: record_error
UPDATE messages SET state = 'error', reason = ?, smtp_code = ?, detail = ?,
    uncertain_at = CASE WHEN ? = 'uncertain' THEN ? END WHERE id = ?;

-- name: mark_failed
UPDATE messages SET state = 'failed', reason = ?, smtp_code = ?, detail = ? WHERE id = ?;

-- name: suppress_bounced
INSERT INTO suppressions VALUES (?, ?, ?, ?) ON CONFLICT (email) DO NOTHING;

-- name: cut_uncertain
UPDATE messages SET state = 'error', reason = 'uncertain', uncertain_at = ?, detail = ?
    WHERE id = ? AND state = 'sending' RETURNING id;

-- name: throttle_message
UPDATE messages SET state = 'scheduled', smtp_code = ?, detail = ? WHERE id = ?;

-- name: throttle_mailbox
INSERT INTO mailbox_health (mailbox, state, since, throttled_until)
    VALUES (?, 'connected', ?, ?)
    ON CONFLICT (mailbox) DO UPDATE SET throttled_until = excluded.throttled_until;

-- name: disconnect
INSERT INTO mailbox_health (mailbox, state, reason, since, failures, next_probe_at)
    VALUES (?1, ?5, ?2, ?3, 1, ?4)
    ON CONFLICT (mailbox) DO UPDATE SET
    since = CASE WHEN mailbox_health.state = ?5 THEN mailbox_health.since ELSE excluded.since END,
    failures = CASE WHEN mailbox_health.state = ?5 THEN mailbox_health.failures + 1 ELSE 1 END,
    state = ?5, reason = excluded.reason, next_probe_at = excluded.next_probe_at;

-- name: reset_probe
UPDATE mailbox_health SET failures = 0, next_probe_at = NULL WHERE mailbox = ?;

-- name: back_from_retry_queue
-- (a message held by a paused cadence gets its own due time back: the claim holds it again while paused)
UPDATE messages SET due_at = coalesce(held_due, due_at), held_due = NULL,
    state = 'scheduled', reason = NULL, detail = 'back from the retry queue'
    WHERE mailbox = ? AND state = 'error' AND reason IN ('disconnected', 'refused') RETURNING id;

-- name: catch_due_while_down
UPDATE messages SET state = 'error', reason = coalesce(
    (SELECT state FROM mailbox_health WHERE mailbox = ?1), 'disconnected'),
    detail = 'came due while the mailbox was ' || coalesce(
    (SELECT state FROM mailbox_health WHERE mailbox = ?1), 'disconnected')
    WHERE mailbox = ?1 AND state = 'scheduled' AND due_at <= ?2 RETURNING id;

-- name: set_probe
UPDATE mailbox_health SET next_probe_at = ?, failures = failures + 1, reason = ?
    WHERE mailbox = ?;

-- name: mark_deferred
UPDATE messages SET detail = ?1 WHERE mailbox = ?2 AND state = 'scheduled' AND due_at < ?3
    AND (detail IS NULL OR substr(detail, 1, length(?1)) != ?1) RETURNING id;

-- name: note_quota_day
UPDATE mailbox_health SET quota_day = ? WHERE mailbox = ?;

-- name: note_limit_logged
UPDATE mailbox_health SET limit_logged_day = ?1 WHERE mailbox = ?2
    AND (limit_logged_day IS NULL OR limit_logged_day != ?1) RETURNING mailbox;

-- name: rotated_mailboxes
SELECT DISTINCT mailbox FROM rotation_counts;

-- name: mailboxes_with_health
SELECT mailbox FROM mailbox_health;

-- name: never_contacted
SELECT e.id, e.cadence, e.owner, e.adder FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.state = 'error' AND m.mailbox = ?1 AND m.reason IN ('disconnected', 'refused') AND m.step = 1
    AND e.mailbox = ?1 AND e.state = 'active'
    UNION ALL
    SELECT e.id, e.cadence, e.owner, e.adder FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.state = 'scheduled' AND m.mailbox = ?1 AND m.step = 1 AND e.mailbox = ?1 AND e.state = 'active'
    ORDER BY 1;

-- name: probe_now
UPDATE mailbox_health SET next_probe_at = ? WHERE mailbox = ? AND state IN ('disconnected', 'refused');

-- name: imap_position
SELECT uidvalidity, last_uid FROM imap_state WHERE mailbox = ?;

-- name: set_imap_position
INSERT INTO imap_state VALUES (?, ?, ?) ON CONFLICT (mailbox)
    DO UPDATE SET uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid;

-- name: enrollments_of_sender
SELECT id, cadence, email, state FROM enrollments WHERE email = ? AND mailbox = ? AND state = 'active';

-- name: mark_bounced
UPDATE enrollments SET state = 'bounced', ended_at = ? WHERE id = ? AND state = 'active';

-- name: count_block
INSERT INTO mailbox_health (mailbox, state, since, blocks) VALUES (?, 'connected', ?, 1)
    ON CONFLICT (mailbox) DO UPDATE SET blocks = mailbox_health.blocks + 1;

-- The last column: left in `sending` by a daemon whose mailbox another took over (orphaned_to_uncertain):
-- that daemon may still be alive (stopped, cut off) and deliver it late.
-- name: uncertain_message_ids
SELECT id, message_id, coalesce(uncertain_at, 0), CASE WHEN detail LIKE 'found in sending when %' THEN 1 ELSE 0 END
    FROM messages WHERE state = 'error' AND mailbox = ? AND reason = 'uncertain' AND message_id IS NOT NULL;

-- name: uncertain_route
SELECT m.enrollment_id, m.step, e.cadence, e.mailbox, m.mailbox FROM messages m
    JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.id = ? AND m.state = 'error' AND m.reason = 'uncertain';

-- name: settle_delivered
UPDATE messages SET state = 'sent', reason = NULL, sent_at = ?, detail = ? WHERE id = ?;

-- name: settle_not_delivered
UPDATE messages SET state = 'scheduled', reason = NULL, detail = ? WHERE id = ?;

-- name: schedule_step
INSERT INTO messages (enrollment_id, step, mailbox, state, due_at)
    SELECT id, ?, ?, 'scheduled', ? FROM enrollments WHERE id = ? AND state = 'active'
    ON CONFLICT (enrollment_id, step) DO NOTHING;

-- name: finish_enrollment
UPDATE enrollments SET state = 'finished', ended_at = ? WHERE id = ? AND state = 'active'
    RETURNING cadence;

-- name: scheduled_in_order
SELECT due_at, step, enrollment_id, id FROM messages
    WHERE mailbox = ? AND state = 'scheduled' AND due_at < ? ORDER BY due_at, id;

-- name: first_message_of
SELECT e.email, e.fields, m.mailbox FROM enrollments e
    JOIN messages m ON m.enrollment_id = e.id AND m.step = 1
    WHERE e.id = ?;

-- name: route_of
SELECT cadence, mailbox FROM enrollments WHERE id = ?;

-- name: cancel_messages_of_email
UPDATE messages SET state = 'cancelled', detail = ?
    WHERE state IN ('scheduled', 'error') AND enrollment_id IN
    (SELECT e.id FROM enrollments e WHERE e.email = ?) RETURNING id;

-- name: end_enrollments_of_email
UPDATE enrollments SET state = ?, ended_at = ?
    WHERE state = 'active' AND id IN (SELECT e.id FROM enrollments e WHERE e.email = ?);

-- name: cancel_messages_of_id
UPDATE messages SET state = 'cancelled', detail = ?
    WHERE state IN ('scheduled', 'error') AND enrollment_id = ? RETURNING id;

-- name: end_enrollments_of_id
UPDATE enrollments SET state = ?, ended_at = ? WHERE state = 'active' AND id = ?;

-- name: scheduled_to_error
UPDATE messages SET state = 'error', reason = ?, detail = ?
    WHERE mailbox = ? AND state = 'scheduled' RETURNING id;

-- name: sending_to_error
UPDATE messages SET state = 'error', reason = ?, detail = ?
    WHERE mailbox = ? AND state = 'sending' RETURNING id;


-- name: pending_ids
SELECT id FROM messages WHERE mailbox = ?1 AND state = 'scheduled'
UNION ALL SELECT id FROM messages WHERE mailbox = ?1 AND state = 'sending'
UNION ALL SELECT id FROM messages WHERE mailbox = ?1 AND state = 'error'
ORDER BY id;

-- name: pending_ids_certain
SELECT id FROM messages WHERE mailbox = ?1 AND state = 'scheduled' AND coalesce(reason, '') != 'uncertain'
UNION ALL SELECT id FROM messages WHERE mailbox = ?1 AND state = 'sending' AND coalesce(reason, '') != 'uncertain'
UNION ALL SELECT id FROM messages WHERE mailbox = ?1 AND state = 'error' AND coalesce(reason, '') != 'uncertain'
ORDER BY id;

-- name: suppressions
SELECT email, reason, created_at FROM suppressions ORDER BY created_at, email;

-- name: first_emails_waiting
SELECT count(*) FROM messages WHERE mailbox = ? AND state = 'scheduled' AND step = 1 AND due_at < ?;

-- name: first_emails_on
SELECT first_emails FROM daily_counts WHERE mailbox = ? AND day = ?;

-- A paused cadence's due messages on a mailbox are held: their due time kept, never due while it is paused.
-- name: hold_cadence_due
UPDATE messages SET held_due = due_at, due_at = ?1, detail = ?2 WHERE id IN (
    SELECT m.id FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ?3 AND m.state = 'scheduled' AND m.due_at <= ?5 AND e.cadence = ?4)
    RETURNING id;

-- name: release_held
UPDATE messages SET due_at = held_due, held_due = NULL, detail = NULL WHERE id IN (
    SELECT m.id FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
    WHERE m.mailbox = ?1 AND m.state = 'scheduled' AND m.due_at >= ?2 AND e.cadence = ?3)
    RETURNING id;

-- name: pause_cadence
INSERT INTO cadence_pauses (cadence, paused_at, reason) VALUES (?, ?, ?) ON CONFLICT (cadence) DO NOTHING
    RETURNING cadence;

-- name: unpause_cadence
DELETE FROM cadence_pauses WHERE cadence = ? RETURNING paused_at;

-- name: cadence_pauses
SELECT cadence, paused_at, reason FROM cadence_pauses ORDER BY cadence;

-- name: mailboxes_with_scheduled
SELECT mailbox FROM message_counts WHERE state = 'scheduled' AND n > 0 ORDER BY mailbox;

-- name: log_end_of_email
INSERT INTO enrollment_events (enrollment_id, at, kind, detail)
    SELECT id, ?, ?, ? FROM enrollments WHERE state = 'active' AND email = ?;

-- name: log_end_of_id
INSERT INTO enrollment_events (enrollment_id, at, kind, detail)
    SELECT id, ?, ?, ? FROM enrollments WHERE state = 'active' AND id = ?;

-- name: log_event
INSERT INTO enrollment_events (enrollment_id, at, kind, detail) VALUES (?, ?, ?, ?);

-- prospect show: an address's enrollments, their messages and events, in order
-- name: enrollments_of_email
SELECT id, cadence, mailbox, owner, adder, state, fields, created_at, ended_at, outcome, coalesce(seq, id)
    FROM enrollments WHERE email = ? ORDER BY created_at, id;

-- name: messages_of_enrollment
SELECT id, step, mailbox, state, reason, COALESCE(held_due, due_at), sent_at, message_id, subject, detail, attempts,
    variant
    FROM messages WHERE enrollment_id = ? ORDER BY step;

-- name: events_of_enrollment
SELECT at, kind, detail FROM enrollment_events WHERE enrollment_id = ? ORDER BY at;

-- name: suppression_of
SELECT reason, created_at FROM suppressions WHERE email = ?;

-- Addresses near a mistyped one: those that begin as it does (through the address index), for a suggestion.
-- name: emails_from
SELECT DISTINCT email FROM enrollments WHERE email >= ? AND email < ? ORDER BY email LIMIT 5000;

-- name: set_fields
UPDATE enrollments SET fields = ? WHERE id = ?;

-- name: set_outcome
UPDATE enrollments SET outcome = ? WHERE id = ?;

-- name: cadence_to_error
UPDATE messages SET state = 'error', reason = 'cadence_removed', detail = ?
    WHERE state = 'scheduled' AND enrollment_id IN (SELECT e.id FROM enrollments e WHERE e.cadence = ?) RETURNING id;

-- stop_on_reply = "company": the enrollments of a cadence at a domain (?2: "@domain")
-- name: wrote_to_domain
SELECT 1 FROM enrollments WHERE cadence = ?1 AND mailbox = ?2
    AND substr(email, length(email) - length(?3) + 1) = ?3 LIMIT 1;

-- name: active_at_domain
SELECT id, email FROM enrollments WHERE cadence = ?1 AND state = 'active'
    AND substr(email, length(email) - length(?2) + 1) = ?2;

-- `cadenced report`: results summed by cadence (and step, variant, mailbox or day) and kind; `first`: of step 1
-- (a prospect's first email: contacted). ?1: the cadence, ?2 true for every cadence, ?3 the first day. All time
-- is read from result_totals, a day and after from result_days, except per variant or mailbox from a day on.
-- name: results_total
SELECT cadence, kind, step = 1, sum(n) FROM result_totals WHERE (cadence = ?1 OR ?2 = 1)
    GROUP BY cadence, kind, step = 1;

-- name: results_total_since
SELECT cadence, kind, step = 1, sum(n) FROM result_days WHERE (cadence = ?1 OR ?2 = 1) AND day >= ?3
    GROUP BY cadence, kind, step = 1;

-- name: results_by_step
SELECT cadence, step, kind, step = 1, sum(n) FROM result_totals WHERE (cadence = ?1 OR ?2 = 1) AND kind <> 'enrolled'
    GROUP BY cadence, step, kind;

-- name: results_by_step_since
SELECT cadence, step, kind, step = 1, sum(n) FROM result_days
    WHERE (cadence = ?1 OR ?2 = 1) AND day >= ?3 AND kind <> 'enrolled'
    GROUP BY cadence, step, kind;

-- name: results_by_variant
SELECT cadence, step, variant, kind, step = 1, sum(n) FROM result_totals
    WHERE (cadence = ?1 OR ?2 = 1) AND kind <> 'enrolled'
    GROUP BY cadence, step, variant, kind;

-- name: results_by_variant_since
SELECT cadence, step, variant, kind, step = 1, sum(n) FROM results
    WHERE (cadence = ?1 OR ?2 = 1) AND day >= ?3 AND kind <> 'enrolled'
    GROUP BY cadence, step, variant, kind;

-- name: results_by_mailbox
SELECT cadence, mailbox, kind, step = 1, sum(n) FROM result_totals WHERE (cadence = ?1 OR ?2 = 1)
    GROUP BY cadence, mailbox, kind, step = 1;

-- name: results_by_mailbox_since
SELECT cadence, mailbox, kind, step = 1, sum(n) FROM results WHERE (cadence = ?1 OR ?2 = 1) AND day >= ?3
    GROUP BY cadence, mailbox, kind, step = 1;

-- name: results_by_day
SELECT cadence, day, kind, step = 1, sum(n) FROM result_days WHERE (cadence = ?1 OR ?2 = 1) AND day >= ?3
    GROUP BY cadence, day, kind, step = 1;

-- /metrics: each cadence's messages by step, variant and what became of them.
-- name: results_of_messages
SELECT cadence, step, variant, kind, sum(n) FROM result_totals WHERE step > 0 GROUP BY cadence, step, variant, kind;

-- The dashboard's sign-ins.
-- name: make_web_key
INSERT INTO daemon_state VALUES ('web_key', ?) ON CONFLICT (key) DO NOTHING;

-- name: web_key
SELECT value FROM daemon_state WHERE key = 'web_key';

-- name: open_web_session
INSERT INTO web_sessions VALUES (?, ?, ?, ?);

-- name: forget_web_sessions
DELETE FROM web_sessions WHERE expires_at < ?;

-- name: web_session
SELECT role FROM web_sessions WHERE digest = ? AND expires_at >= ?;

-- name: end_web_session
DELETE FROM web_sessions WHERE digest = ?;
