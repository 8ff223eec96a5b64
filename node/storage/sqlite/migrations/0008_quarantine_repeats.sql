-- Quarantine without duplicates (issue 16): identical refused bytes are one
-- entry, counted. The area keeps received bytes sealed (a fresh nonce each
-- time), so the sealed blob's hash cannot tell two sends apart: the hash of
-- the bytes as received does. A released entry's received hash also lets an
-- identical resend of what was released be answered as already stored.

ALTER TABLE quarantine ADD COLUMN received_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE quarantine ADD COLUMN times_received INTEGER NOT NULL DEFAULT 1;
ALTER TABLE quarantine ADD COLUMN last_received_at TEXT;
UPDATE quarantine SET last_received_at = received_at;
CREATE INDEX quarantine_received_idx ON quarantine (received_sha256);
