-- lamina: foreign-keys-off
-- The review states (issue 10) and `pending` (an annotation whose source series
-- has not arrived yet, issue 16). The transitions between them are not a
-- database concern: node/annotations/states.py is the one state machine; this
-- CHECK only keeps a typo from ever being stored.
--
-- SQLite cannot alter a CHECK constraint: the table is rebuilt by its
-- documented procedure (foreign keys off for this migration only, checked
-- with foreign_key_check before the commit).

CREATE TABLE annotation_new (
    id                 INTEGER PRIMARY KEY,
    kind               TEXT NOT NULL CHECK (kind IN ('seg', 'overlay')),
    key                TEXT NOT NULL UNIQUE,
    source_series_uid  TEXT NOT NULL,
    annotator_ae       TEXT NOT NULL,
    annotator_address  TEXT NOT NULL,
    annotator_person   TEXT NOT NULL DEFAULT '',
    state              TEXT NOT NULL CHECK (state IN ('received', 'pending', 'checked',
                           'refused', 'needs-adjudication', 'adjudicated', 'approved',
                           'rejected')),
    revision           INTEGER NOT NULL DEFAULT 0,
    current_check_fk   INTEGER REFERENCES annotation_check (id),
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);
INSERT INTO annotation_new (id, kind, key, source_series_uid, annotator_ae, annotator_address,
    annotator_person, state, revision, current_check_fk, created_at, updated_at)
    SELECT id, kind, key, source_series_uid, annotator_ae, annotator_address, annotator_person,
    state, revision, current_check_fk, created_at, updated_at FROM annotation;
DROP TABLE annotation;
ALTER TABLE annotation_new RENAME TO annotation;
CREATE INDEX annotation_series_idx ON annotation (source_series_uid);
CREATE INDEX annotation_state_idx ON annotation (state);
