"""A synthetic corpus with PHI planted everywhere an anonymiser tends to miss it.

Every planted value is a distinctive string, so "nothing planted survives" can be
checked by searching the output bytes. The corpus has three patients (two sharing a
PatientID under different issuers), four CT series in four transfer syntaxes
(explicit and implicit VR little endian, deflated, RLE lossless), nested sequences
several levels deep, private tags with and without creators, free text, person names
in every text VR, dates in DA/DT/TM at every depth, overlay and curve groups with
labels, an unknown public tag holding a UID (arrives as UN from implicit VR), and a
SEG built with highdicom that references one of the CT series. Generation is
deterministic except for the SEG's own creation date and time (highdicom sets them).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

PRIVATE_CREATOR = "PLANTED CREATOR 1.0"
UNKNOWN_PUBLIC_UID_TAG = 0x0012EE42  # not in the data dictionary: read back as UN


def uid(*parts: object) -> str:
    """A deterministic original UID (what a PACS would have assigned)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'planted:' + '/'.join(map(str, parts))).int}"


@dataclass(frozen=True)
class Patient:
    key: str
    family: str
    given: str
    patient_id: str
    issuer: str
    birth_date: str
    age: str

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"


PATIENTS = (
    Patient("A", "Quixbyrne", "Zephyrine", "PLNT-MRN-40017", "HOSP-PLANTED-NORTH", "19310317", "093Y"),
    Patient("B", "Vantwerpel", "Haldorix", "PLNT-MRN-50221", "HOSP-PLANTED-NORTH", "19620804", "061Y"),
    # Same PatientID as A, other issuer: a different person.
    Patient("C", "Ottolenghy", "Ambrosine", "PLNT-MRN-40017", "HOSP-PLANTED-SOUTH", "19850112", "038Y"),
)

# Values planted for every patient; "{f}"/"{g}" are the patient's family/given names.
STAFF = {
    "ReferringPhysicianName": "Drplantedref^Ignatius",
    "PerformingPhysicianName": "Drplantedperf^Oswin",
    "OperatorsName": "Techplanted^Rosalind",
    "NameOfPhysiciansReadingStudy": "Drplantedread^Barnaby",
    "PhysiciansOfRecord": "Drplantedrecord^Clementine",
}


@dataclass(frozen=True)
class Study:
    patient: Patient
    index: int
    study_date: str
    transfer_syntax: str
    n_slices: int = 4

    @property
    def study_uid(self) -> str:
        return uid(self.patient.key, self.index, "study")

    @property
    def series_uid(self) -> str:
        return uid(self.patient.key, self.index, "series")

    @property
    def frame_of_reference(self) -> str:
        return uid(self.patient.key, self.index, "for")

    def sop_uid(self, i: int) -> str:
        return uid(self.patient.key, self.index, "sop", i)


STUDIES = (
    Study(PATIENTS[0], 1, "20230314", ExplicitVRLittleEndian),
    Study(PATIENTS[0], 2, "20230911", ImplicitVRLittleEndian),
    Study(PATIENTS[1], 1, "20220127", DeflatedExplicitVRLittleEndian),
    Study(PATIENTS[2], 1, "20211005", RLELossless),
)


@dataclass
class Corpus:
    """Paths and expectations of a generated corpus."""

    root: Path
    files: list[Path] = field(default_factory=list)
    ct: dict[tuple[str, int], list[Path]] = field(default_factory=dict)
    seg: Path | None = None
    screen_capture: Path | None = None
    ultrasound_no_text: Path | None = None
    planted: set[str] = field(default_factory=set)


def _planted_text(p: Patient) -> dict[str, str]:
    """Attribute keyword -> planted value, one person name per text VR."""
    return {
        "PatientName": p.name,                                          # PN
        "OtherPatientNames": f"{p.family}^Zelda",                      # PN
        "PatientBirthName": f"{p.family}born^{p.given}",               # PN
        "PatientMotherBirthName": "Grisewoodplant^Mathilde",          # PN
        "OtherPatientIDs": f"PLNT-OTHER-{p.patient_id[-5:]}",           # LO
        "PatientAddress": f"17 Plantedlane, {p.family}ville",          # LO
        "PatientTelephoneNumbers": "+44 7700 900417",                  # SH
        "Occupation": f"{p.family}ist",                                 # SH
        "AdditionalPatientHistory": f"{p.given} fell off a ladder",    # LT
        "PatientComments": f"Call {p.given} {p.family} at home",       # LT
        "StrainDescription": f"Strain named after {p.family}",         # UC
        "InstitutionName": "Saint Plantedbury Hospital",               # LO
        "InstitutionAddress": "1 Plantedbury Road, Plantedshire",      # ST
        "InstitutionalDepartmentName": "Plantedology Department",      # LO
        "StationName": "PLNTSTATION07",                                # SH
        "StationAETitle": "PLNTSTATIONAE",                             # AE
        "PerformedStationAETitle": "PLNTPERFAE",                       # AE
        "DeviceSerialNumber": "SN-PLNT-99121",                         # LO
        "AccessionNumber": f"ACC-PLNT-{p.key}55",                      # SH
        "StudyID": f"SID-PLNT-{p.key}7",                               # SH
        "StudyDescription": f"CT chest for {p.family}",                # LO
        "SeriesDescription": f"Series seen by {p.given}",              # LO
        "ProtocolName": f"Protocol {p.given}",                         # LO
        "ImageComments": f"{p.family} moved during the scan",          # LT
        "RequestedProcedureDescription": f"Requested by {p.family}",  # LO
        "PerformedProcedureStepDescription": "Plantedstep description",  # LO
        "PositionReferenceIndicator": f"{p.family}mark",               # LO, Type 2
        "RetrieveURL": f"https://pacs.plantedbury.example/{p.family}",  # UR
        "BodyPartExamined": p.family.upper(),                          # CS (own name)
        **STAFF,
    }


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _nested(p: Patient, study: Study, i: int) -> Dataset:
    """Four levels of sequences the profile keeps (anatomic region codes, image
    references), each level carrying planted names, dates and a private element."""
    level4 = Dataset()
    level4.PersonName = f"{p.family}^Deepest"                         # (0040,A123) D
    level4.Date = study.study_date                                     # (0040,A121) DA
    level4.DateTime = f"{study.study_date}101112"                      # DT
    level4.add_new(0x00290010, "LO", PRIVATE_CREATOR)
    level4.add_new(0x00291001, "LO", f"deep private {p.given}")
    level3 = Dataset()
    level3.ReferencedSOPClassUID = CTImageStorage
    level3.ReferencedSOPInstanceUID = study.sop_uid((i + 1) % study.n_slices)
    level3.PurposeOfReferenceCodeSequence = Sequence([_code_item("121311", "DCM", "Localizer")])
    level3.ContentSequence = Sequence([level4])                        # D: recursed
    level2 = _code_item("T-D3000", "SRT", "Chest")
    level2.AnatomicRegionModifierSequence = Sequence([_code_item("G-A101", "SRT", "Left")])
    level2.ReferencedImageSequence = Sequence([level3])                # X/Z/U*: kept, remapped
    level2.ContentCreatorName = f"Creator^{p.family}"                 # Z/D
    level1 = Sequence([level2])
    holder = Dataset()
    holder.AnatomicRegionSequence = level1                             # not in the table: kept
    return holder


def _ct_slice(study: Study, i: int, rng: np.random.Generator, rows: int, columns: int,
              planted: bool) -> Dataset:
    p = study.patient
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = study.sop_uid(i)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if study.transfer_syntax == (
        ImplicitVRLittleEndian) else ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "PLNTSOURCEAE"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = study.sop_uid(i)
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid
    ds.FrameOfReferenceUID = study.frame_of_reference
    ds.Modality = "CT"
    ds.Manufacturer = "Lamina Test Phantoms"
    ds.ManufacturerModelName = "Phantom 1"
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = p.issuer
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = "F"
    ds.PatientAge = p.age
    ds.PatientWeight = "61.5"
    ds.StudyDate = study.study_date
    ds.StudyTime = "101112"
    ds.SeriesDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.ContentDate = study.study_date
    ds.ContentTime = "101530.25"
    ds.InstanceCreationDate = study.study_date
    # A TM carrying a date-time (invalid as TM, seen in practice): added unvalidated.
    ds.add(DataElement(0x00080013, "TM", f"{study.study_date}101112",
                       validation_mode=config.IGNORE))
    ds.AcquisitionDateTime = f"{study.study_date}101112.123456"
    ds.SeriesNumber = 1
    ds.InstanceNumber = i + 1
    ds.KVP = "120"
    ds.SliceThickness = "2.5"
    ds.ImagePositionPatient = [-100.0, -100.0, -50.0 + 2.5 * i]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceLocation = -50.0 + 2.5 * i
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"
    pixels = rng.integers(-1000, 1500, size=(rows, columns), dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    if not planted:
        return ds

    for keyword, value in _planted_text(p).items():
        setattr(ds, keyword, value)
    ds.AnatomicRegionSequence = _nested(p, study, i).AnatomicRegionSequence
    if i > 0:
        source = Dataset()
        source.ReferencedSOPClassUID = CTImageStorage
        source.ReferencedSOPInstanceUID = study.sop_uid(i - 1)
        ds.SourceImageSequence = Sequence([source])
    request = Dataset()
    request.RequestedProcedureID = "RPID-PLNT-31"
    request.ScheduledProcedureStepID = "SPSID-PLNT-32"
    request.ReasonForTheRequestedProcedure = f"{p.family} complained"
    ds.RequestAttributesSequence = Sequence([request])
    context = Dataset()
    context.ValueType = "TEXT"
    context.ConceptNameCodeSequence = Sequence([_code_item("121106", "DCM", "Comment")])
    context.TextValue = f"Acquired while {p.given} held breath"        # UT
    context.DateTime = f"{study.study_date}101112"
    ds.AcquisitionContextSequence = Sequence([context])
    # Private tags: a block with a creator (text, date, UID, nested SQ) ...
    ds.add_new(0x00090010, "LO", PRIVATE_CREATOR)
    ds.add_new(0x00091001, "LO", f"private note on {p.family}")
    ds.add_new(0x00091002, "DA", study.study_date)
    ds.add_new(0x00091003, "UI", study.sop_uid((i + 1) % study.n_slices))
    ds.add_new(0x00091004, "US", 7)
    private_item = Dataset()
    private_item.PatientName = f"{p.family}^Private"
    ds.add_new(0x00091005, "SQ", Sequence([private_item]))
    # ... and one without any creator.
    ds.add_new(0x00111010, "LO", f"orphan private {p.given}")
    # An unknown public tag holding a UID: arrives as UN when read from implicit VR.
    ds.add_new(UNKNOWN_PUBLIC_UID_TAG, "UN", study.sop_uid(0).encode("ascii"))
    # Overlay plane with labels, and a curve.
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", columns)
    ds.add_new(0x60000022, "LO", f"drawn by Dr Plantedoverlay for {p.family}")
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60001500, "LO", f"{p.family} lesion")
    overlay = np.zeros((rows, columns), dtype=np.uint8)
    overlay[4:8, 4:8] = 1
    ds.add_new(0x60003000, "OW", np.packbits(overlay.ravel(), bitorder="little").tobytes())
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50000022, "LO", f"curve of {p.given}")
    ds.add_new(0x50003000, "OW", b"\x01\x00\x02\x00")
    return ds


def write_ct_series(study: Study, directory: Path, *, rows: int = 32, columns: int = 32,
                    planted: bool = True) -> list[Path]:
    """Write one CT series; ``planted=False`` gives a plain phantom (benchmarks)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(study.index * 7919 + ord(study.patient.key))
    paths = []
    for i in range(study.n_slices):
        ds = _ct_slice(study, i, rng, rows, columns, planted)
        path = directory / f"ct_{study.patient.key}{study.index}_{i:04d}.dcm"
        if study.transfer_syntax == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        elif study.transfer_syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _seg(study: Study, ct_paths: list[Path], path: Path) -> None:
    p = study.patient
    sources = [dcmread(x) for x in ct_paths]
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=np.uint8)
    mask[1:3, 8:16, 8:16] = 1
    mask[0:2, 20:28, 20:28] = 2
    tumour = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=f"{p.family} tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    tumour.SegmentDescription = f"outlined for {p.given} {p.family}"
    liver = hd.seg.SegmentDescription(
        segment_number=2,
        segment_label="Liver",
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[tumour, liver],
        series_instance_uid=uid(p.key, study.index, "seg-series"),
        series_number=100,
        sop_instance_uid=uid(p.key, study.index, "seg"),
        instance_number=1,
        manufacturer="Lamina Test Annotators",
        manufacturer_model_name="Planted Contour Tool",
        software_versions="1.0",
        device_serial_number="SN-PLNT-SEG-4411",
        content_description=f"Contoured for {p.given} {p.family}",
        content_creator_name="Contourerplanted^Philippa",
        content_label=p.family.upper(),
    )
    seg.SeriesDescription = f"Segmentation of {p.family}"
    seg.save_as(path, enforce_file_format=True)


def _capture(path: Path, sop_class: str, burned_in: str | None, modality: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid(path.name)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(path.name)
    ds.StudyInstanceUID = uid(path.name, "study")
    ds.SeriesInstanceUID = uid(path.name, "series")
    ds.Modality = modality
    ds.PatientName = PATIENTS[1].name
    ds.PatientID = PATIENTS[1].patient_id
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256))
    dcmwrite(path, ds, enforce_file_format=True)


def build_corpus(root: Path) -> Corpus:
    """Write the whole corpus under ``root`` and return what a test needs to know."""
    corpus = Corpus(root=root)
    for study in STUDIES:
        paths = write_ct_series(study, root / f"ct_{study.patient.key}{study.index}")
        corpus.ct[(study.patient.key, study.index)] = paths
        corpus.files += paths
        corpus.planted |= {study.study_uid, study.series_uid, study.frame_of_reference}
        corpus.planted |= {study.sop_uid(i) for i in range(study.n_slices)}
        corpus.planted.add(study.study_date)
    seg_study = STUDIES[0]
    corpus.seg = root / "seg_A1.dcm"
    _seg(seg_study, corpus.ct[("A", 1)], corpus.seg)
    corpus.files.append(corpus.seg)
    corpus.planted |= {uid("A", 1, "seg-series"), uid("A", 1, "seg")}
    corpus.planted |= {"SN-PLNT-SEG-4411", "Contourerplanted", "Philippa"}

    corpus.screen_capture = root / "capture_sc.dcm"
    _capture(corpus.screen_capture, SecondaryCaptureImageStorage, None, "OT")
    corpus.ultrasound_no_text = root / "capture_us_clean.dcm"
    _capture(corpus.ultrasound_no_text, UltrasoundImageStorage, "NO", "US")

    for p in PATIENTS:
        corpus.planted |= {p.family, p.given, p.patient_id, p.issuer, p.birth_date}
        for value in _planted_text(p).values():
            corpus.planted |= {part for part in value.split("^") if len(part) > 3}
        if int(p.age[:3]) >= 90:
            corpus.planted.add(p.age)
    corpus.planted |= {
        PRIVATE_CREATOR, "PLNTSOURCEAE", "PLNTPERFAE", "RPID-PLNT-31", "SPSID-PLNT-32",
        "Plantedoverlay",
    }
    _check_pixels_free_of_planted(corpus)
    return corpus


def _check_pixels_free_of_planted(corpus: Corpus) -> None:
    """Pixel data passes through untouched, so it must not contain a planted value
    by accident, or the leak test would blame the anonymiser for the generator."""
    for path in corpus.files:
        pixels = bytes(dcmread(path).PixelData).lower()
        for value in corpus.planted:
            if value.lower().encode() in pixels:
                raise RuntimeError("generated pixel data contains a planted value")
