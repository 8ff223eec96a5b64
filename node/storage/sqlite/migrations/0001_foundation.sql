-- Lamina index, first schema: the four query levels, conflicts, quarantine
-- and the audit trail. Names follow DICOM keywords in snake_case so that the
-- C-FIND / QIDO-RS matcher can map attributes to columns by rule.

CREATE TABLE patient (
    id                INTEGER PRIMARY KEY,
    patient_id        TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    patient_name      TEXT,
    patient_birth_date TEXT,
    patient_sex       TEXT,
    UNIQUE (patient_id, issuer_of_patient_id)
);
CREATE INDEX patient_name_idx ON patient (patient_name);

CREATE TABLE study (
    id                INTEGER PRIMARY KEY,
    patient_fk        INTEGER NOT NULL REFERENCES patient (id),
    study_instance_uid TEXT NOT NULL UNIQUE,
    study_date        TEXT,
    study_time        TEXT,
    accession_number  TEXT,
    study_id          TEXT,
    study_description TEXT,
    referring_physician_name TEXT,
    -- backslash-joined, sorted; maintained when a series of a new modality arrives
    modalities_in_study TEXT NOT NULL DEFAULT ''
);
CREATE INDEX study_patient_idx ON study (patient_fk);
CREATE INDEX study_date_idx ON study (study_date);
CREATE INDEX study_accession_idx ON study (accession_number);

CREATE TABLE series (
    id                INTEGER PRIMARY KEY,
    study_fk          INTEGER NOT NULL REFERENCES study (id),
    series_instance_uid TEXT NOT NULL UNIQUE,
    modality          TEXT,
    series_number     INTEGER,
    series_description TEXT
);
CREATE INDEX series_study_idx ON series (study_fk);
CREATE INDEX series_modality_idx ON series (modality);

CREATE TABLE instance (
    id                INTEGER PRIMARY KEY,
    series_fk         INTEGER NOT NULL REFERENCES series (id),
    sop_instance_uid  TEXT NOT NULL UNIQUE,
    sop_class_uid     TEXT NOT NULL,
    instance_number   INTEGER,
    blob_sha256       TEXT NOT NULL,
    blob_size         INTEGER NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae        TEXT NOT NULL,
    association_id    TEXT NOT NULL,
    received_at       TEXT NOT NULL
);
CREATE INDEX instance_series_idx ON instance (series_fk);
CREATE INDEX instance_blob_idx ON instance (blob_sha256);

-- A known SOP Instance UID received again with different bytes: kept, never
-- overwriting the stored instance, never served.
CREATE TABLE conflict (
    id                INTEGER PRIMARY KEY,
    sop_instance_uid  TEXT NOT NULL,
    sop_class_uid     TEXT NOT NULL,
    blob_sha256       TEXT NOT NULL,
    blob_size         INTEGER NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    stored_blob_sha256 TEXT NOT NULL,
    calling_ae        TEXT NOT NULL,
    association_id    TEXT NOT NULL,
    received_at       TEXT NOT NULL,
    UNIQUE (sop_instance_uid, blob_sha256)
);

-- Objects that were received but not stored: the bytes are in the blob store,
-- the reason says why. The node never deletes these.
CREATE TABLE quarantine (
    id                INTEGER PRIMARY KEY,
    blob_sha256       TEXT NOT NULL,
    blob_size         INTEGER NOT NULL,
    reason            TEXT NOT NULL,
    status_code       INTEGER NOT NULL,
    calling_ae        TEXT NOT NULL,
    association_id    TEXT NOT NULL,
    received_at       TEXT NOT NULL
);
CREATE INDEX quarantine_blob_idx ON quarantine (blob_sha256);

-- Append-only, hash-chained. The triggers stop accidental edits through the
-- node's own connection; deliberate tampering with the file is caught by
-- `lamina audit verify` (hash chain plus the signed head checkpoint).
CREATE TABLE audit_event (
    seq        INTEGER PRIMARY KEY,
    time       TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    object     TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event
BEGIN SELECT RAISE(ABORT, 'audit trail is append-only'); END;
CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event
BEGIN SELECT RAISE(ABORT, 'audit trail is append-only'); END;
