-- Query/retrieve (issue 4): the columns C-FIND and QIDO-RS match on beyond the
-- foundation's, and the indexes that keep every listed query an index lookup.

-- Person-name keys (node/storage/pn.py): upper case, accents and empty
-- trailing components removed, one column per component group. The matcher
-- compares these; the original value is what responses return.
ALTER TABLE patient ADD COLUMN patient_name_key TEXT;
ALTER TABLE patient ADD COLUMN patient_name_ideographic_key TEXT;
ALTER TABLE patient ADD COLUMN patient_name_phonetic_key TEXT;
CREATE INDEX patient_name_key_idx ON patient (patient_name_key);

ALTER TABLE study ADD COLUMN referring_physician_name_key TEXT;
ALTER TABLE study ADD COLUMN referring_physician_name_ideographic_key TEXT;
ALTER TABLE study ADD COLUMN referring_physician_name_phonetic_key TEXT;

-- Rows indexed before this migration: keys from the alphabetic group with
-- SQLite's upper() (exact for ASCII names, which pseudonymised names are;
-- accented letters keep their case until the instance is indexed again).
UPDATE patient SET patient_name_key = nullif(rtrim(upper(
    CASE WHEN instr(patient_name, '=') > 0
         THEN substr(patient_name, 1, instr(patient_name, '=') - 1)
         ELSE patient_name END), '^ '), '')
WHERE patient_name IS NOT NULL;
UPDATE study SET referring_physician_name_key = nullif(rtrim(upper(
    CASE WHEN instr(referring_physician_name, '=') > 0
         THEN substr(referring_physician_name, 1, instr(referring_physician_name, '=') - 1)
         ELSE referring_physician_name END), '^ '), '')
WHERE referring_physician_name IS NOT NULL;

-- Series and instance attributes that SCUs and QIDO-RS commonly ask for.
ALTER TABLE series ADD COLUMN series_date TEXT;
ALTER TABLE series ADD COLUMN series_time TEXT;
ALTER TABLE instance ADD COLUMN content_date TEXT;
ALTER TABLE instance ADD COLUMN content_time TEXT;
ALTER TABLE instance ADD COLUMN acquisition_date_time TEXT;

-- Study-level ModalitiesInStudy matching reads series by (modality, study):
-- the study ids come straight from the index, without visiting series rows.
DROP INDEX series_modality_idx;
CREATE INDEX series_modality_study_idx ON series (modality, study_fk);
-- Retrieval and IMAGE-level queries list a series' instances in order.
DROP INDEX instance_series_idx;
CREATE INDEX instance_series_number_idx ON instance (series_fk, instance_number);
