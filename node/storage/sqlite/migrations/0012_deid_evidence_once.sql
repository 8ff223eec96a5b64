-- Each distinct de-identification evidence text is stored once (issue 15). Every slice of
-- a series is de-identified by the same rules, so its ~2 KB of evidence is the same text:
-- one row per instance made the evidence about 60 % of the index (one 4 KB page per
-- instance, the largest row SQLite writes per stored instance) and four of the fifteen
-- pages each instance's transaction wrote. An instance now names its text by id; texts
-- are found by their SHA-256 (hex of the UTF-8 JSON), which the repository computes and
-- this migration gets from lamina_sha256(), registered on the migrating connection.
CREATE TABLE deid_evidence_text (
    id       INTEGER PRIMARY KEY,
    sha256   TEXT NOT NULL UNIQUE,
    evidence TEXT NOT NULL
);
INSERT INTO deid_evidence_text (sha256, evidence)
    SELECT lamina_sha256(evidence), evidence FROM deid_evidence GROUP BY evidence;
-- WITHOUT ROWID: keyed by the SOP Instance UID itself, one B-tree instead of a table and
-- its primary-key index.
CREATE TABLE deid_evidence_instance (
    sop_instance_uid   TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    route              TEXT NOT NULL,
    evidence_fk        INTEGER NOT NULL REFERENCES deid_evidence_text (id)
) WITHOUT ROWID;
INSERT INTO deid_evidence_instance (sop_instance_uid, study_instance_uid, route, evidence_fk)
    SELECT e.sop_instance_uid, e.study_instance_uid, e.route, t.id
    FROM deid_evidence e JOIN deid_evidence_text t ON t.sha256 = lamina_sha256(e.evidence);
DROP TABLE deid_evidence;
ALTER TABLE deid_evidence_instance RENAME TO deid_evidence;
CREATE INDEX deid_evidence_study_idx ON deid_evidence (study_instance_uid);
