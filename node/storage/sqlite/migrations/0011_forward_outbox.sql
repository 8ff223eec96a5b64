-- The forwarding outbox (issue 11): one row per (object, destination), written
-- in the same transaction as the approval that triggers it, sent by the
-- supervisor's forward worker. UNIQUE (sop_instance_uid, destination) makes a
-- second approval or rule naming the same object a no-op: never two deliveries
-- of one object to one destination without a crash in between.
--
-- state: queued (never tried) -> sent | failed (tried, will retry at
-- next_attempt_at) -> sent | dead (max attempts reached, last error kept);
-- cancelled by an operator; refused (the object may not leave: audited).

CREATE TABLE forward_item (
    id                  INTEGER PRIMARY KEY,
    annotation_fk       INTEGER NOT NULL REFERENCES annotation (id),
    rule                TEXT NOT NULL,           -- the [forward.rules.NAME] that queued it
    destination         TEXT NOT NULL,           -- a configured peer's name
    kind                TEXT NOT NULL CHECK (kind IN ('seg', 'source')),
    mode                TEXT NOT NULL CHECK (mode IN ('stored', 'reidentified')),
    sop_instance_uid    TEXT NOT NULL,           -- as stored (pseudonymous)
    sop_class_uid       TEXT NOT NULL,
    blob_sha256         TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    state               TEXT NOT NULL CHECK (state IN ('queued', 'failed', 'sent', 'dead',
                            'cancelled', 'refused')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL,           -- epoch seconds
    last_status         INTEGER,                 -- the destination's C-STORE status, if it answered
    last_error          TEXT,                    -- why the last attempt failed (our words or its ErrorComment)
    warning             TEXT,                    -- a warning status (0xB...) the delivery was answered with
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    sent_at             TEXT,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX forward_item_due_idx ON forward_item (state, next_attempt_at);
CREATE INDEX forward_item_annotation_idx ON forward_item (annotation_fk);
