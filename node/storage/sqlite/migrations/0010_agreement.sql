-- Agreement between raters, double reading and adjudication (issue 10 §1–§3).
--
-- annotation.rater: who annotated, as the index knows them (the association's
-- DICOM user identity, else ContentCreatorName, else the calling AE title).
-- Staff, not patients: kept in the index, never written to logs.
ALTER TABLE annotation ADD COLUMN rater TEXT NOT NULL DEFAULT '';
UPDATE annotation SET rater = CASE WHEN annotator_person != '' THEN annotator_person
                                   ELSE annotator_ae END;
CREATE INDEX annotation_rater_idx ON annotation (source_series_uid, rater);

-- One comparison of two raters' current readings of one series. Recomputed
-- (replaced) when either reading gets a new check; `verdict` says whether the
-- protocol's thresholds call for adjudication.
CREATE TABLE agreement (
    id                 INTEGER PRIMARY KEY,
    series_uid         TEXT NOT NULL,
    study_uid          TEXT NOT NULL,
    annotation_a       INTEGER NOT NULL REFERENCES annotation (id),
    annotation_b       INTEGER NOT NULL REFERENCES annotation (id),
    check_a            INTEGER NOT NULL,
    check_b            INTEGER NOT NULL,
    rater_a            TEXT NOT NULL,
    rater_b            TEXT NOT NULL,
    protocol_sha256    TEXT NOT NULL,
    verdict            TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree')),
    reasons            TEXT NOT NULL,          -- JSON list of plain-words reasons
    computed_at        TEXT NOT NULL,
    UNIQUE (annotation_a, annotation_b)
);
CREATE INDEX agreement_series_idx ON agreement (series_uid);

-- Per structure of a comparison: a matched pair (both ids) or one rater's only.
CREATE TABLE agreement_structure (
    agreement_fk       INTEGER NOT NULL REFERENCES agreement (id) ON DELETE CASCADE,
    class_key          TEXT NOT NULL,
    structure_a        TEXT,
    structure_b        TEXT,
    answer_a           TEXT NOT NULL,          -- the categorical answer (type code) or '(absent)'
    answer_b           TEXT NOT NULL,
    question           TEXT NOT NULL,          -- the SEG category the type answers
    classes_differ     INTEGER NOT NULL DEFAULT 0,
    dice               REAL,
    jaccard            REAL,
    hausdorff_mm       REAL,
    hd95_mm            REAL,
    volume_a_mm3       REAL,
    volume_b_mm3       REAL
);
CREATE INDEX agreement_structure_idx ON agreement_structure (agreement_fk);
CREATE INDEX agreement_structure_class_idx ON agreement_structure (class_key);

-- Categorical labels per slice or per study (`lamina labels import`, SR TID 1500):
-- one answer per rater per item and question; a second answer is refused.
CREATE TABLE rating (
    id                 INTEGER PRIMARY KEY,
    question           TEXT NOT NULL,          -- the protocol class or finding the label answers
    item               TEXT NOT NULL,          -- 'study:<uid>' or 'instance:<uid>'
    study_uid          TEXT NOT NULL,
    rater              TEXT NOT NULL,
    answer             TEXT NOT NULL,
    source             TEXT NOT NULL,          -- csv:<sha256 of the file> | sr:<sop uid>
    recorded_at        TEXT NOT NULL,
    UNIQUE (question, item, rater)
);
CREATE INDEX rating_question_idx ON rating (question);

-- Studies chosen for a second independent reading and where they stand.
CREATE TABLE double_read (
    study_uid          TEXT PRIMARY KEY,
    state              TEXT NOT NULL CHECK (state IN ('waiting', 'complete')),
    chosen_at          TEXT NOT NULL,
    completed_at       TEXT
);

-- The adjudication queue: a disagreeing comparison and what the adjudicator decided.
CREATE TABLE adjudication (
    id                 INTEGER PRIMARY KEY,
    agreement_fk       INTEGER NOT NULL UNIQUE REFERENCES agreement (id),
    state              TEXT NOT NULL CHECK (state IN ('open', 'decided')),
    opened_at          TEXT NOT NULL,
    decision           TEXT,                   -- pick | consensus
    chosen_annotation  INTEGER REFERENCES annotation (id),
    decided_by         TEXT,
    decided_at         TEXT
);
