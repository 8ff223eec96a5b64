"""What an object must become before it is stored, by the route of the peer that sent it.

* ``clinical`` peers (PACS, modalities) send identified data: every object is
  de-identified by PS3.15 Annex E with keyed pseudonyms before it is stored.
* ``annotator`` peers (Horos, Slicer, pipelines) work on the pseudonymous
  studies we served them. An annotation that still references an original
  clinical UID (the tool loaded the study from the PACS) has that UID moved onto
  its pseudonym; one that still carries patient identity is de-identified too,
  keeping the pseudonymous UIDs it already references so its links hold
  (unless its patient is already our pseudonym with identity typed back in:
  that one is quarantined for a person to look at). An annotation drawn on a
  study stored as it was received (from a ``deidentified`` peer: a public
  collection with its own IDs) names that study's patient exactly as stored:
  it is matched to the stored objects as they are, never pseudonymised a
  second time; and when an annotation is de-identified, every UID the index
  holds (study, series, instance, frame of reference) is kept, so only
  identifiers neither stored nor known originals get new pseudonyms.
* ``deidentified`` peers vouch that their objects were de-identified upstream
  (a research archive behind its own de-identification gateway): they are
  stored exactly as received.

Either way the original bytes never reach the blob store; what the
re-identification map must learn and what de-identification did (the
evidence) travel with the result into the index transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.anonymize.anonymizer import (
    DeidentificationError,
    Deidentifier,
    ReidEntry,
    looks_identified,
    remap_known_uids,
)
from node.anonymize.keys import ProjectKey
from node.anonymize.reidmap import ReidentificationMap
from node.storage.interface import Index, Reader, Transaction


@dataclass(frozen=True)
class Prepared:
    """The object as it will be stored, and what the index must record about it."""

    dataset: Dataset
    entries: tuple[ReidEntry, ...]
    #: The de-identification evidence as the index stores it (``DeidEvidence.as_json``).
    evidence: str | None
    route: str
    #: Store the received bytes themselves (nothing was changed).
    as_received: bool = False


class Router:
    """Applies a peer's route to a received file."""

    def __init__(self, deidentifier: Deidentifier, key: ProjectKey, index: Index,
                 annotation_deidentifier: Deidentifier) -> None:
        self.deidentifier = deidentifier
        #: The same profile with Clean Graphics on and the annotation text kept (labels,
        #: descriptions, ContentCreatorName; cleaned of the patient): overlay planes and
        #: their labels are how Horos annotations travel, so on this route they are kept.
        self.annotation_deidentifier = annotation_deidentifier
        self.key = key
        self.reid_map = ReidentificationMap(key)
        self.index = index

    @staticmethod
    def stores_as_received(route: str) -> bool:
        """Whether objects on ``route`` are stored as the bytes received (``deidentified``:
        de-identified upstream); every other route stores an object of its own."""
        return route == "deidentified"

    def prepare(self, received: Dataset, route: str) -> Prepared:
        """Make a received object fit to store.

        Raises the engine's ``BurnedInTextRisk`` / ``DeidentificationError`` when
        it must not be stored; the caller quarantines it.
        """
        if self.stores_as_received(route):
            return Prepared(received, (), None, route, as_received=True)
        if route == "annotator":
            return self._annotation(received)
        result = self.deidentifier.deidentify(received)
        return Prepared(result.dataset, result.entries, result.evidence.as_json(), route)

    def _annotation(self, received: Dataset) -> Prepared:
        with self.index.reader() as reader:
            def known(uid: str) -> bool:
                return self.reid_map.knows_uid(reader, uid)

            remapped, _count = remap_known_uids(received, self.key, known)
            reason = looks_identified(remapped)
            if reason is None:
                return Prepared(remapped, (), None, "annotator")
            patient_id = str(remapped.get("PatientID", "") or "")
            if self.reid_map.lookup_patient(reader, patient_id) is not None:
                # Our pseudonym plus identity typed back in: de-identifying again would
                # pseudonymise the pseudonym and shift shifted dates. A person decides.
                raise DeidentificationError(f"annotation still carries identity: {reason}")
            if _names_stored_patient(reader, remapped):
                # Drawn on a study stored as it was received (a `deidentified` source):
                # it carries nothing the stored study does not, and is matched to it as is.
                return Prepared(remapped, (), None, "annotator")

            def kept(uid: str) -> bool:
                return known(uid) or reader.instances.holds_uid(uid)

            # Built on the clinical original (the tool had it from the PACS): the same
            # keyed rules give the same pseudonyms and date shift as the stored study;
            # references to objects stored as they are keep their UIDs.
            result = self.annotation_deidentifier.deidentify(remapped, keep_uid=kept)
        return Prepared(result.dataset, result.entries, result.evidence.as_json(), "annotator")

    def record(self, tx: Transaction, prepared: Prepared, sop_instance_uid: str,
               study_instance_uid: str) -> None:
        """Inside the instance's index transaction: the map entries and the evidence."""
        if prepared.entries:
            self.reid_map.record(tx, prepared.entries)
        if prepared.evidence is not None:
            tx.evidence.put(sop_instance_uid, study_instance_uid, prepared.route,
                            prepared.evidence)


def _names_stored_patient(reader: Reader, ds: Dataset) -> bool:
    """The object's study is stored, under exactly the PatientID and issuer it names."""
    study = str(ds.get("StudyInstanceUID", "") or "")
    if not study:
        return False
    stored = reader.instances.patient_of_study(study)
    return stored == (str(ds.get("PatientID", "") or ""),
                      str(ds.get("IssuerOfPatientID", "") or ""))
