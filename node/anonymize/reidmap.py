"""The encrypted re-identification map, and re-identification through it.

The map is the only place Lamina keeps identified data: pseudonymous PatientID →
original PatientID, PatientName, issuer and date offset; pseudonymous UID → original
UID. Rows are found by an HMAC of the pseudonym and their payload is AES-GCM
encrypted, both under keys derived from the project key, so the index file alone
reveals nothing. Methods take the caller's index reader or transaction and never
commit: recording belongs in the same transaction as storing the object, so a crash
leaves both or neither.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from node.anonymize.anonymizer import (
    PatientEntry,
    ReidEntry,
    UidEntry,
    encode_un_uids,
    parse_un_uids,
)
from node.anonymize.keys import ProjectKey
from node.anonymize.temporal import (
    TIMES_SHIFTED,
    TemporalOffset,
    partner_time_tag,
    shift_values,
)
from node.storage.interface import Reader, Transaction

_MARKERS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


class ReidentificationError(Exception):
    """A value cannot be mapped back (unknown, written under another key, or the
    stored row does not decrypt). Messages name pseudonyms, never originals."""


@dataclass(frozen=True)
class PatientIdentity:
    """The original identity behind a pseudonymous PatientID."""

    patient_id: str
    patient_name: str
    issuer: str
    date_offset_days: int
    # None in rows written before times were shifted (issue 16): the key gives it.
    time_offset_minutes: int | None = None


class ReidentificationMap:
    """Reads and writes the map tables created by migration 0004."""

    def __init__(self, key: ProjectKey) -> None:
        self._key = key
        self._aead = AESGCM(key.map_key)
        self._foreign: dict[str, str | None] = {}
        #: Rows sealed by this process, by (kind, plaintext): every slice of a series
        #: carries the same patient, study, series and frame-of-reference entries, and
        #: the table keeps the first row of a lookup (INSERT OR IGNORE), so sealing them
        #: again per instance is wasted (an HMAC, AES-GCM and JSON each). A nonce is
        #: reused only with its own plaintext, i.e. the identical ciphertext. Still
        #: inserted every time, so a rolled-back transaction loses nothing.
        self._sealed: dict[tuple[str, bytes], tuple[bytes, str, bytes, bytes]] = {}

    def record(self, tx: Transaction, entries: Iterable[ReidEntry]) -> int:
        """Store entries inside the caller's transaction; entries already present
        are left as they are (an identical resend records nothing new). Returns the
        number of rows inserted."""
        rows: dict[str, list[tuple[bytes, str, bytes, bytes]]] = {"patient": [], "uid": []}
        for entry in entries:
            if isinstance(entry, PatientEntry):
                kind, pseudonym = "patient", entry.pseudonym_id
                payload = {
                    "patient_id": entry.original_id,
                    "patient_name": entry.original_name,
                    "issuer": entry.issuer,
                    "date_offset_days": entry.date_offset_days,
                    "time_offset_minutes": entry.time_offset_minutes,
                }
            elif isinstance(entry, UidEntry):
                kind, pseudonym = "uid", entry.pseudonym_uid
                payload = {"original_uid": entry.original_uid}
            else:
                raise TypeError(f"not a re-identification entry: {type(entry).__name__}")
            rows[kind].append(self._seal(kind, pseudonym, payload))
        return sum(tx.reid.insert(kind, values) for kind, values in rows.items() if values)

    def lookup_patient(self, reader: Reader, pseudonym_id: str) -> PatientIdentity | None:
        """The original identity behind a pseudonymous PatientID, or None."""
        payload = self._open(reader, "patient", pseudonym_id)
        if payload is None:
            return None
        return PatientIdentity(
            patient_id=payload["patient_id"],
            patient_name=payload["patient_name"],
            issuer=payload["issuer"],
            date_offset_days=int(payload["date_offset_days"]),
            time_offset_minutes=(None if payload.get("time_offset_minutes") is None
                                 else int(payload["time_offset_minutes"])),
        )

    def temporal_offset(self, identity: PatientIdentity, study_uid: str) -> TemporalOffset:
        """The offset de-identification moved this patient's dates and times by.
        Rows written before times were shifted lack the minutes: they come from the
        key, as de-identification derived them (from the original PatientID, or the
        original study when the object had none)."""
        minutes = identity.time_offset_minutes
        if minutes is None:
            patient_key = identity.patient_id.strip() or "study:" + study_uid
            minutes = self._key.temporal_offset(identity.issuer, patient_key).minutes
        return TemporalOffset(identity.date_offset_days, minutes)

    def lookup_uid(self, reader: Reader, pseudonym_uid: str) -> str | None:
        """The original UID behind a pseudonymous UID, or None."""
        payload = self._open(reader, "uid", pseudonym_uid)
        return None if payload is None else payload["original_uid"]

    def knows_uid(self, reader: Reader, pseudonym_uid: str) -> bool:
        """Is this one of our pseudonymous UIDs? (No decryption: a keyed lookup only.)"""
        return reader.reid.exists("uid", self._key.lookup("uid", pseudonym_uid))

    def _seal(self, kind: str, pseudonym: str, payload: dict) -> tuple[bytes, str, bytes, bytes]:
        plaintext = json.dumps(payload, sort_keys=True).encode("utf-8")
        known = self._sealed.get((kind + "\0" + pseudonym, plaintext))
        if known is not None:
            return known
        lookup = self._key.lookup(kind, pseudonym)
        nonce = os.urandom(12)
        row = (lookup, self._key.key_id, nonce,
               self._aead.encrypt(nonce, plaintext, _aad(kind, lookup)))
        if len(self._sealed) >= _SEALED_KEPT:
            self._sealed.clear()
        self._sealed[(kind + "\0" + pseudonym, plaintext)] = row
        return row

    def _open(self, reader: Reader, kind: str, pseudonym: str) -> dict | None:
        lookup = self._key.lookup(kind, pseudonym)
        row = reader.reid.get(kind, lookup)
        if row is None:
            foreign = self._foreign_key_id(reader, kind)
            if foreign is not None:
                raise ReidentificationError(
                    f"{pseudonym} is not in the map under key {self._key.key_id}; the map "
                    f"holds entries written under key {foreign}: is this the project's key?"
                )
            return None
        key_id, nonce, payload = row
        try:
            plaintext = self._aead.decrypt(nonce, payload, _aad(kind, lookup))
        except InvalidTag:
            raise ReidentificationError(
                f"the map entry for {pseudonym} (written under key {key_id}) does not "
                f"decrypt with key {self._key.key_id}"
            ) from None
        return json.loads(plaintext)

    def _foreign_key_id(self, reader: Reader, kind: str) -> str | None:
        """A key id other than ours found among the entries (looked up once per kind)."""
        if kind not in self._foreign:
            self._foreign[kind] = reader.reid.foreign_key_id(kind, self._key.key_id)
        return self._foreign[kind]


#: Sealed rows remembered (a few series' shared entries; instance UIDs come once each).
_SEALED_KEPT = 4096


def _aad(kind: str, lookup: bytes) -> bytes:
    """Binds each ciphertext to its row, so payloads cannot be swapped between rows."""
    return b"lamina-reid-v1\x00" + kind.encode() + b"\x00" + lookup


def reidentify_uid(reader: Reader, rmap: ReidentificationMap, uid: str) -> str:
    """The original of a pseudonymous UID. Raises ReidentificationError if unknown.

    Re-identification is an auditable event: the node calls this (and
    :func:`reidentify_dataset`) only from its audited re-identification service,
    which records who asked for which pseudonym before returning the result."""
    original = rmap.lookup_uid(reader, uid.strip())
    if original is None:
        raise ReidentificationError(f"{uid.strip()} is not a pseudonymous UID in the map")
    return original


def reidentify_dataset(
    reader: Reader, rmap: ReidentificationMap, ds: Dataset
) -> Dataset:
    """A copy of a pseudonymous object mapped back onto the original identifiers:
    every UID found in the map (at any depth, in UN elements, and in file meta), the
    patient's ID,
    name and issuer, and — when the object declares its dates MODIFIED — its dates,
    shifted back by the patient's offset, and its times too when its
    DeidentificationMethod says they were shifted (objects de-identified before
    times were shifted keep theirs). Objects made after de-identification (an
    annotator's SEG) keep their own new UIDs and, lacking that declaration, their own
    dates, while their references land on the original study.

    Attributes the de-identification removed cannot come back. Audited like
    :func:`reidentify_uid`."""
    out = copy.deepcopy(ds)
    pseudonym_id = str(out.get("PatientID", "") or "")
    patient = rmap.lookup_patient(reader, pseudonym_id) if pseudonym_id else None
    restore_dates = (
        patient is not None
        and str(out.get("LongitudinalTemporalInformationModified", "")) == "MODIFIED"
    )
    cache: dict[str, str] = {}
    offset = None
    if restore_dates:
        times = TIMES_SHIFTED in [str(v) for v in _as_list(out.get("DeidentificationMethod"))]
        study = _original(str(out.get("StudyInstanceUID", "") or ""), reader, rmap, cache)
        offset = (rmap.temporal_offset(patient, study) if times
                  else TemporalOffset(patient.date_offset_days))
    _restore(out, reader, rmap, cache, offset)
    meta = getattr(out, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = _original(
            str(meta.MediaStorageSOPInstanceUID), reader, rmap, cache
        )
    if patient is not None:
        out.PatientID = patient.patient_id
        out.PatientName = patient.patient_name
        if patient.issuer:
            out.IssuerOfPatientID = patient.issuer
        for keyword in _MARKERS:
            if keyword in out:
                delattr(out, keyword)
    return out


def _original(uid: str, reader: Reader, rmap: ReidentificationMap,
              cache: dict[str, str]) -> str:
    if uid not in cache:
        well_known = uid in UID_dictionary or uid.startswith("1.2.840.10008.")
        cache[uid] = uid if well_known else rmap.lookup_uid(reader, uid) or uid
    return cache[uid]


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, MultiValue)) else [value]


def _restore(ds: Dataset, reader: Reader, rmap: ReidentificationMap,
             cache: dict[str, str], offset: TemporalOffset | None) -> None:
    # Dates are restored from the dataset as it came (the paired times still shifted),
    # so the pair is undone exactly as it was done.
    dates = {}
    if offset is not None:
        for elem in ds:
            if elem.VR in ("DA", "DT", "TM") and elem.value:
                partner = partner_time_tag(elem.tag) if elem.VR == "DA" else None
                times = None
                if partner is not None and partner in ds and ds[partner].value:
                    times = [str(v) for v in _as_list(ds[partner].value)]
                dates[elem.tag] = shift_values(
                    elem.VR, [str(v) for v in _as_list(elem.value)], offset,
                    times=times, reverse=True)
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _restore(item, reader, rmap, cache, offset)
        elif elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            restored = [_original(str(v), reader, rmap, cache) for v in values]
            elem.value = restored if len(restored) > 1 else restored[0]
        elif elem.VR == "UN" and (uids := parse_un_uids(elem.value)) is not None:
            elem.value = encode_un_uids([_original(u, reader, rmap, cache) for u in uids])
        elif dates.get(elem.tag) is not None:
            restored = dates[elem.tag]
            elem.value = restored if len(restored) > 1 else restored[0]
