-- Annotations (issue 5): DICOM-SEGs and Horos/OsiriX overlay copies, checked
-- against the stored series and the labelling protocol.
--
-- An annotation is one SEG, or one annotator's overlay copies of one series
-- (the copies arrive one slice per C-STORE and form structures together).
-- Every received object is a row of annotation_object; its bytes are a blob.
-- Each check run is kept (annotation_check) with the structures it measured
-- and the findings it made, so re-checking under a new protocol never erases
-- what an earlier check said.

CREATE TABLE annotation (
    id                 INTEGER PRIMARY KEY,
    kind               TEXT NOT NULL CHECK (kind IN ('seg', 'overlay')),
    -- seg: 'seg|' + the SEG's SOP Instance UID; overlay: 'overlay|' + series UID + '|' + AE + '|' + person
    key                TEXT NOT NULL UNIQUE,
    source_series_uid  TEXT NOT NULL,          -- '' when a refused SEG named no stored series
    annotator_ae       TEXT NOT NULL,
    annotator_address  TEXT NOT NULL,
    annotator_person   TEXT NOT NULL DEFAULT '',  -- ContentCreatorName / OperatorsName: staff, not patients
    state              TEXT NOT NULL CHECK (state IN ('received', 'checked', 'refused')),
    -- bumped by every accepted object; a check run records its results only if
    -- the revision it read is still current (concurrent copies of one set)
    revision           INTEGER NOT NULL DEFAULT 0,
    current_check_fk   INTEGER REFERENCES annotation_check (id),
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);
CREATE INDEX annotation_series_idx ON annotation (source_series_uid);
CREATE INDEX annotation_state_idx ON annotation (state);

CREATE TABLE annotation_object (
    id                 INTEGER PRIMARY KEY,
    annotation_fk      INTEGER NOT NULL REFERENCES annotation (id),
    sop_instance_uid   TEXT NOT NULL,
    sop_class_uid      TEXT NOT NULL,
    blob_sha256        TEXT NOT NULL,
    blob_size          INTEGER NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    slice_index        INTEGER,                -- overlay copies: the grid slice they annotate
    state              TEXT NOT NULL CHECK (state IN ('current', 'superseded', 'refused')),
    refusal_check      TEXT,
    refusal_reason     TEXT,
    quarantine_fk      INTEGER REFERENCES quarantine (id),
    calling_ae         TEXT NOT NULL,
    association_id     TEXT NOT NULL,
    received_at        TEXT NOT NULL
);
CREATE INDEX annotation_object_set_idx ON annotation_object (annotation_fk, state, slice_index);
CREATE INDEX annotation_object_blob_idx ON annotation_object (blob_sha256);

-- Each overlay plane of a current or superseded copy, as its bounding box
-- (numpy packbits, row-major): a set's structures are rebuilt from these
-- without re-reading every copy's blob when one more slice arrives.
CREATE TABLE overlay_roi (
    object_fk          INTEGER NOT NULL REFERENCES annotation_object (id),
    group_number       INTEGER NOT NULL,
    label              TEXT NOT NULL,
    slice_index        INTEGER NOT NULL,
    row0               INTEGER NOT NULL,
    col0               INTEGER NOT NULL,
    rows               INTEGER NOT NULL,
    cols               INTEGER NOT NULL,
    bits               BLOB NOT NULL,
    PRIMARY KEY (object_fk, group_number)
);

CREATE TABLE annotation_check (
    id                 INTEGER PRIMARY KEY,
    annotation_fk      INTEGER NOT NULL REFERENCES annotation (id),
    revision           INTEGER NOT NULL,
    protocol_name      TEXT NOT NULL,
    protocol_sha256    TEXT NOT NULL,          -- '' for the built-in default protocol
    verdict            TEXT NOT NULL CHECK (verdict IN ('pass', 'findings')),
    checked_at         TEXT NOT NULL
);
CREATE INDEX annotation_check_annotation_idx ON annotation_check (annotation_fk);

CREATE TABLE annotation_structure (
    id                 INTEGER PRIMARY KEY,
    check_fk           INTEGER NOT NULL REFERENCES annotation_check (id),
    structure_id       TEXT NOT NULL,          -- 'segment 3', 'roi Nodule 1'
    label              TEXT NOT NULL,
    class_key          TEXT,                   -- the protocol class, NULL when unknown
    category           TEXT,                   -- JSON {value, scheme, meaning}
    type               TEXT,
    voxels             INTEGER NOT NULL,
    volume_mm3         REAL NOT NULL,
    max_diameter_mm    REAL NOT NULL,
    first_slice        INTEGER,                -- 1-based, NULL when empty
    last_slice         INTEGER,
    slice_count        INTEGER NOT NULL,
    provenance         TEXT NOT NULL,          -- SHA-256 of the object(s) the mask came from
    UNIQUE (check_fk, structure_id)
);

CREATE TABLE annotation_finding (
    id                 INTEGER PRIMARY KEY,
    check_fk           INTEGER NOT NULL REFERENCES annotation_check (id),
    annotation_fk      INTEGER NOT NULL REFERENCES annotation (id),
    check_name         TEXT NOT NULL,          -- empty, components, slice-gap, diameter-jump, ...
    structure_id       TEXT NOT NULL,
    label              TEXT NOT NULL,
    slices             TEXT NOT NULL,          -- JSON [{slice (1-based), position_mm, sop_instance_uid}]
    detail             TEXT NOT NULL
);
CREATE INDEX annotation_finding_check_idx ON annotation_finding (check_fk);
CREATE INDEX annotation_finding_name_idx ON annotation_finding (check_name);
