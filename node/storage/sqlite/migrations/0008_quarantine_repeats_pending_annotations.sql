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

-- Annotations that arrive before their images (issue 16): why an annotation is
-- in its state (the pending wait's reason, a refusal's reason) and since when
-- (a pending annotation is refused when its series has not come within the
-- configured wait). Written only by the state machine's moves.
ALTER TABLE annotation ADD COLUMN state_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE annotation ADD COLUMN state_since TEXT;
UPDATE annotation SET state_since = updated_at;

-- An annotation de-identified on the annotator route keeps every UID the index
-- holds (objects stored as they were received): frames of reference included.
CREATE INDEX instance_geometry_frame_idx ON instance_geometry (frame_of_reference_uid);
