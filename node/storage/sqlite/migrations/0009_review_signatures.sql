-- Reviewers and their electronic signatures (issue 10 §4).
--
-- A user row is never deleted: disabling keeps it, so a user id is never
-- reused and every old signature still finds the public key it was made with.
-- The private key is stored sealed under the user's passphrase (AES-GCM under
-- a scrypt-derived key, node/review/users.py): the node cannot sign for a user
-- without that passphrase.
-- A signature row keeps the canonical manifest exactly as signed; the columns
-- beside it are copies for queries, and verify checks they agree with it.

CREATE TABLE review_user (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused
    user_id            TEXT NOT NULL UNIQUE,
    printed_name       TEXT NOT NULL,
    -- other names this person annotates under (rater ids, ContentCreatorName, AE titles):
    -- what self-approval is checked against; JSON list
    rater_ids          TEXT NOT NULL DEFAULT '[]',
    public_key         BLOB NOT NULL,                      -- raw Ed25519, 32 bytes
    private_key        BLOB NOT NULL,                      -- sealed (users.py)
    failed_attempts    INTEGER NOT NULL DEFAULT 0,
    locked_at          TEXT,
    disabled_at        TEXT,
    created_at         TEXT NOT NULL
);

CREATE TABLE review_signature (
    id                 INTEGER PRIMARY KEY,
    annotation_fk      INTEGER NOT NULL REFERENCES annotation (id),
    user_fk            INTEGER NOT NULL REFERENCES review_user (id),
    decision           TEXT NOT NULL CHECK (decision IN ('approved', 'rejected')),
    meaning            TEXT NOT NULL,
    signed_at          TEXT NOT NULL,
    manifest           TEXT NOT NULL,          -- canonical JSON, the exact bytes signed
    signature          BLOB NOT NULL           -- Ed25519 over the manifest
);
CREATE INDEX review_signature_annotation_idx ON review_signature (annotation_fk);

-- A signature is never changed or removed by the node (verify catches whoever
-- drops these guards and does it anyway).
CREATE TRIGGER review_signature_no_update BEFORE UPDATE ON review_signature
BEGIN SELECT RAISE(ABORT, 'signatures are append-only'); END;
CREATE TRIGGER review_signature_no_delete BEFORE DELETE ON review_signature
BEGIN SELECT RAISE(ABORT, 'signatures are append-only'); END;
