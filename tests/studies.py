"""Small synthetic studies for the query/retrieve tests, and the identifiers that find them.

Studies are written with the phantom generator at 32×32 so that hundreds of
instances stay cheap, with real geometry; a test loads them into a node through
the real C-STORE path (``node.store(files, aet)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from node.phantom import Phantom
from tests.harness import peer

#: The query/retrieve tests relabel phantom CT slices MR or PT to exercise
#: ModalitiesInStudy: validation records that instead of refusing it.
QR_VALIDATION = {"rules": {"modality": "warn"}}


def qr_peer(ae_title: str, *services: str, **extra: Any) -> dict[str, Any]:
    """A peer for matching tests: its studies are synthetic and stored as sent
    (the ``deidentified`` route), so the test can query for the values it wrote."""
    return peer(ae_title, *services, **{"route": "deidentified", **extra})


@dataclass(frozen=True)
class StudySpec:
    """A small synthetic study: what the matching tests look for."""

    seed: str
    patient_name: str
    patient_id: str
    study_date: str
    study_time: str
    accession: str
    modality: str
    description: str = "Synthetic study"
    referring: str = "REFERRER^SYNTHETIC"
    birth_date: str = "19700101"
    sex: str = "O"
    slices: int = 3
    charset: str = "ISO_IR 100"


def write_study(folder: Path, spec: StudySpec) -> list[Path]:
    """The study's slices as files (32×32 pixels: fast to send, real geometry)."""
    phantom = Phantom(seed=spec.seed, slices_count=spec.slices, rows=32, columns=32,
                      pixel_spacing=11.2, patient_name=spec.patient_name,
                      patient_id=spec.patient_id)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(spec.slices):
        ds = phantom.slice(i)
        ds.SpecificCharacterSet = spec.charset
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.study_date
        ds.StudyTime = spec.study_time
        ds.ContentTime = spec.study_time
        ds.AcquisitionDateTime = spec.study_date + spec.study_time
        ds.AccessionNumber = spec.accession
        ds.Modality = spec.modality
        ds.StudyDescription = spec.description
        ds.ReferringPhysicianName = spec.referring
        ds.PatientBirthDate = spec.birth_date
        ds.PatientSex = spec.sex
        path = folder / f"{spec.seed}-{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def identifier(level: str, **keys: object) -> Dataset:
    """A query identifier: ``identifier("STUDY", PatientName="DOE*", StudyInstanceUID="")``."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
