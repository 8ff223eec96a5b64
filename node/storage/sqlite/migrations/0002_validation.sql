-- Validation: what the quarantine knows about each refused object, findings
-- on stored instances and series, the geometry of each instance and the
-- reconstructed geometry and state of each series.

-- Quarantine rows written before this migration kept their bytes in the blob
-- store ('blobs'); from now on refused bytes go to the quarantine area.
ALTER TABLE quarantine ADD COLUMN area TEXT NOT NULL DEFAULT 'blobs';
ALTER TABLE quarantine ADD COLUMN address TEXT NOT NULL DEFAULT '';
ALTER TABLE quarantine ADD COLUMN transfer_syntax_uid TEXT NOT NULL DEFAULT '';
-- Empty when the object could not be parsed far enough to read them.
ALTER TABLE quarantine ADD COLUMN sop_class_uid TEXT NOT NULL DEFAULT '';
ALTER TABLE quarantine ADD COLUMN sop_instance_uid TEXT NOT NULL DEFAULT '';
ALTER TABLE quarantine ADD COLUMN series_instance_uid TEXT NOT NULL DEFAULT '';
-- JSON list of every finding ({rule, message, keyword, tag}); `reason` is the first.
ALTER TABLE quarantine ADD COLUMN findings TEXT NOT NULL DEFAULT '[]';
-- Set once, when a person releases the object (the pipeline re-ran with an override).
ALTER TABLE quarantine ADD COLUMN released_at TEXT;
ALTER TABLE quarantine ADD COLUMN released_by TEXT;
ALTER TABLE quarantine ADD COLUMN release_reason TEXT;
CREATE INDEX quarantine_sop_idx ON quarantine (sop_instance_uid);

-- The attributes the series check needs, taken from the header at ingest so a
-- series check never re-reads blobs. Multi-valued ones are backslash-joined.
CREATE TABLE instance_geometry (
    instance_fk       INTEGER PRIMARY KEY REFERENCES instance (id),
    image_position_patient TEXT,
    image_orientation_patient TEXT,
    pixel_spacing     TEXT,
    rows              INTEGER,
    columns           INTEGER,
    frame_of_reference_uid TEXT,
    number_of_frames  INTEGER,
    acquisition_number INTEGER,
    number_of_series_related_instances INTEGER,
    images_in_acquisition INTEGER
);

-- One run of the series check. `geometry` is JSON: origin, spacing, direction
-- (row, column, slice cosines), size, regular, and the SOP Instance UIDs in
-- slice order; NULL when the series has no slice geometry (SR, multi-frame).
CREATE TABLE series_check (
    id                INTEGER PRIMARY KEY,
    series_fk         INTEGER NOT NULL REFERENCES series (id),
    checked_at        TEXT NOT NULL,
    trigger           TEXT NOT NULL,       -- quiet-period | on-demand
    state             TEXT NOT NULL CHECK (state IN ('complete', 'incomplete')),
    instances         INTEGER NOT NULL,
    geometry          TEXT
);
CREATE INDEX series_check_series_idx ON series_check (series_fk);

-- receiving -> complete | incomplete. A new instance puts a checked series
-- back to receiving; `last_received` (Unix time) starts its quiet period.
CREATE TABLE series_state (
    series_fk         INTEGER PRIMARY KEY REFERENCES series (id),
    state             TEXT NOT NULL CHECK (state IN ('receiving', 'complete', 'incomplete')),
    last_received     REAL NOT NULL,
    check_fk          INTEGER REFERENCES series_check (id)
);
CREATE INDEX series_state_idx ON series_state (state, last_received);

-- Findings kept with what they concern: a stored instance (rules set to
-- "warn") or a series check. Refused instances keep theirs in quarantine.findings.
CREATE TABLE finding (
    id                INTEGER PRIMARY KEY,
    instance_fk       INTEGER REFERENCES instance (id),
    series_check_fk   INTEGER REFERENCES series_check (id),
    rule              TEXT NOT NULL,
    severity          TEXT NOT NULL CHECK (severity IN ('reject', 'warn')),
    keyword           TEXT NOT NULL DEFAULT '',
    tag               TEXT NOT NULL DEFAULT '',
    message           TEXT NOT NULL,
    -- series findings: JSON list of the slice positions (mm along the normal) involved
    positions         TEXT,
    created_at        TEXT NOT NULL,
    CHECK ((instance_fk IS NULL) != (series_check_fk IS NULL))
);
CREATE INDEX finding_instance_idx ON finding (instance_fk);
CREATE INDEX finding_check_idx ON finding (series_check_fk);
CREATE INDEX finding_rule_idx ON finding (rule);
