-- Re-identification map (issue 6): the only identified data Lamina keeps.
-- Each row is found by an HMAC of the pseudonymous value under the project key
-- (lookup) and holds the original values AES-256-GCM encrypted under a key derived
-- from the same project key (nonce, payload); key_id names the key that wrote it, so
-- a wrong key is reported as such instead of as "not found".

CREATE TABLE IF NOT EXISTS reid_patient (
    lookup  BLOB PRIMARY KEY,   -- HMAC(pseudonymous PatientID)
    key_id  TEXT NOT NULL,
    nonce   BLOB NOT NULL,      -- 12 bytes, random per row
    payload BLOB NOT NULL       -- {patient_id, patient_name, issuer, date_offset_days}
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS reid_uid (
    lookup  BLOB PRIMARY KEY,   -- HMAC(pseudonymous UID)
    key_id  TEXT NOT NULL,
    nonce   BLOB NOT NULL,
    payload BLOB NOT NULL       -- {original_uid}
) WITHOUT ROWID;
