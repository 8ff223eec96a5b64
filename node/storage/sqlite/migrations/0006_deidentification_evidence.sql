-- What de-identification did to each stored instance (keywords and counts,
-- never values): the source of `lamina deid report STUDY`.
CREATE TABLE deid_evidence (
    sop_instance_uid   TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    route              TEXT NOT NULL,
    evidence           TEXT NOT NULL
);
CREATE INDEX deid_evidence_study_idx ON deid_evidence (study_instance_uid);

-- Quarantined bytes from a peer may carry PHI: they are kept sealed
-- (AES-GCM under the project key), and `sealed` says so; `route` is the
-- sender's route, which a release re-applies.
ALTER TABLE quarantine ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quarantine ADD COLUMN route TEXT NOT NULL DEFAULT 'clinical';
