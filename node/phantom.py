"""A synthetic CT phantom with real geometry: the test data, the demo study, the benchmark load.

One study, one axial series of 512×512 int16 slices (HU with a -1024
intercept), real ImagePositionPatient/Orientation/PixelSpacing, and a few
spheres of soft tissue and bone in water, so later checks (geometry, masks,
annotation consistency) have structures with known shapes. Everything is
synthetic: names and IDs are made up, UIDs derive from a seed so a test can
rebuild the same study.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


@dataclass(frozen=True)
class Sphere:
    center_mm: tuple[float, float, float]  # patient coordinates (x, y, z)
    radius_mm: float
    hu: int


@dataclass(frozen=True)
class Phantom:
    """The study's parameters; :meth:`slices` yields the datasets."""

    seed: str = "lamina-phantom"
    slices_count: int = 40
    rows: int = 512
    columns: int = 512
    pixel_spacing: float = 0.7
    slice_spacing: float = 2.5
    origin: tuple[float, float, float] = (-179.2, -179.2, -50.0)
    patient_name: str = "PHANTOM^SYNTHETIC"
    patient_id: str = "SYN-0001"
    spheres: tuple[Sphere, ...] = field(default_factory=lambda: (
        Sphere((0.0, 0.0, 0.0), 20.0, 40),
        Sphere((60.0, -30.0, 10.0), 12.0, 700),
        Sphere((-70.0, 40.0, -15.0), 8.0, 60),
    ))

    def uid(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=[self.seed, *map(str, parts)])

    @property
    def study_uid(self) -> str:
        return self.uid("study")

    @property
    def series_uid(self) -> str:
        return self.uid("series")

    def sop_uid(self, index: int) -> str:
        return self.uid("instance", index)

    def z_of(self, index: int) -> float:
        return self.origin[2] + index * self.slice_spacing

    def pixels(self, index: int) -> np.ndarray:
        """Stored values (HU + 1024) of one slice."""
        x = self.origin[0] + np.arange(self.columns) * self.pixel_spacing
        y = self.origin[1] + np.arange(self.rows) * self.pixel_spacing
        xx, yy = np.meshgrid(x, y)
        hu = np.full((self.rows, self.columns), -1000, dtype=np.int16)  # air
        hu[(xx**2 + yy**2) < 150.0**2] = 0  # water body
        z = self.z_of(index)
        for s in self.spheres:
            dz2 = (z - s.center_mm[2]) ** 2
            if dz2 < s.radius_mm**2:
                in_plane = (xx - s.center_mm[0]) ** 2 + (yy - s.center_mm[1]) ** 2
                inside = in_plane < s.radius_mm**2 - dz2
                hu[inside] = s.hu
        return (hu + 1024).astype(np.int16)

    def slice(self, index: int) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = self.sop_uid(index)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = self.sop_uid(index)
        ds.StudyDate = "20260101"
        ds.SeriesDate = "20260101"
        ds.ContentDate = "20260101"
        ds.StudyTime = "120000"
        ds.ContentTime = "120000"
        ds.AccessionNumber = "ACC-SYN-1"
        ds.Modality = "CT"
        ds.Manufacturer = "Lamina Synthetic"
        ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
        ds.StudyDescription = "Synthetic phantom"
        ds.SeriesDescription = "Axial 2.5 mm"
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = f"{self.slice_spacing:g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{self.origin[0]:g}", f"{self.origin[1]:g}",
                                   f"{self.z_of(index):g}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = self.uid("frame-of-reference")
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{self.z_of(index):g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = self.rows
        ds.Columns = self.columns
        ds.PixelSpacing = [f"{self.pixel_spacing:g}", f"{self.pixel_spacing:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = self.pixels(index).tobytes()
        return ds

    def slices(self) -> Iterator[Dataset]:
        for i in range(self.slices_count):
            yield self.slice(i)

    def write(self, folder: Path,
              shaped: Callable[[Dataset, int], Dataset] | None = None) -> list[Path]:
        """Write every slice as a DICOM file (``CT0001.dcm`` ...) and return the paths;
        ``shaped(slice, index)``, when given, makes each slice what is written (a
        benchmark adds a scanner's private groups)."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, ds in enumerate(self.slices()):
            path = folder / f"CT{i + 1:04d}.dcm"
            (shaped(ds, i) if shaped else ds).save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


#: Made-up family and given names for synthetic index rows (pseudonym-like, ASCII
#: plus a few accented ones so that PN matching is exercised).
_FAMILY = ("ADAMS", "BROWN", "CLARK", "DAVIS", "EVANS", "FISCHER", "GARCIA", "HUGHES",
           "IVANOV", "JONES", "KOVACS", "LOPEZ", "MÜLLER", "NOVAK", "OKAFOR", "PETIT",
           "QUINN", "ROSSI", "SMITH", "TANAKA", "URBAN", "VARGA", "WEBER", "XU", "YILMAZ",
           "ZIMMERMANN", "BÉRUBÉ", "DUPONT", "NGUYEN", "SILVA")
_GIVEN = ("ALEX", "BEA", "CHRIS", "DANA", "ELI", "FRAN", "GABI", "HANA", "IVO", "JO")
#: Pseudonym-like family names: a base name and two syllables, 12,000 of them.
_SYLLABLES = ("BA", "KO", "MI", "RU", "TE", "LO", "SA", "VI", "NE", "DU", "GA", "PI", "FO",
              "HE", "ZU", "JA", "WE", "CI", "TO", "YU")


def synthetic_patient_name(patient: int) -> str:
    """The name :func:`index_records` gives patient number ``patient`` (distinct up to 12,000)."""
    family = (_FAMILY[patient % len(_FAMILY)]
              + _SYLLABLES[(patient // len(_FAMILY)) % len(_SYLLABLES)]
              + _SYLLABLES[(patient // (len(_FAMILY) * len(_SYLLABLES))) % len(_SYLLABLES)])
    return f"{family}^{_GIVEN[patient % len(_GIVEN)]}"
#: Study modalities, weighted roughly like a general hospital archive.
_MODALITIES = ("CT",) * 8 + ("MR",) * 6 + ("CR",) * 3 + ("US",) * 2 + ("PT",)


def index_records(patients: int, studies: int, instances_per_study: int,
                  series_per_study: int = 2, seed: str = "lamina-index"):
    """Synthetic (InstanceRecord, Receipt) rows for filling an index in bulk.

    No pixel files: the rows point at a blob hash that is not in any store,
    which is what query benchmarks and large-result tests need. Deterministic
    for a seed: patient ``p`` has PatientID ``PAT{p:07d}`` and the name
    :func:`synthetic_patient_name` gives it; study ``s`` belongs to patient
    ``s % patients``, is dated ``7919 * s`` days after 2015-01-01 modulo ten
    years, and has accession number ``ACC{s:08d}``; its first series has the
    study's modality (CT, MR, CR, US or PT), the others SR.
    """
    import hashlib
    from datetime import date, timedelta

    from node.storage.records import InstanceRecord, Receipt

    # A short root keeps the longest UID (study.series.instance) within 64 characters.
    base = f"{PYDICOM_ROOT_UID}{int(hashlib.sha256(seed.encode()).hexdigest(), 16) % 10**8}"
    start = date(2015, 1, 1)
    per_series = max(1, instances_per_study // series_per_study)
    for s in range(studies):
        pat = s % patients
        name = synthetic_patient_name(pat)
        day = (start + timedelta(days=(s * 7919) % 3652)).strftime("%Y%m%d")
        modality = _MODALITIES[(s * 31) % len(_MODALITIES)]
        study_uid = f"{base}.1.{s}"
        for n in range(instances_per_study):
            series_index = min(n // per_series, series_per_study - 1)
            rec = InstanceRecord(
                patient_id=f"PAT{pat:07d}", issuer_of_patient_id="", patient_name=name,
                patient_birth_date=f"{1930 + pat % 80}0{1 + pat % 9}1{pat % 10}",
                patient_sex="MF"[pat % 2], study_instance_uid=study_uid, study_date=day,
                study_time=f"{8 + s % 10:02d}{s % 60:02d}00", accession_number=f"ACC{s:08d}",
                study_id=str(s % 1000), study_description="Synthetic study",
                referring_physician_name="REFERRER^SYNTHETIC",
                series_instance_uid=f"{study_uid}.{series_index}",
                modality=modality if series_index == 0 else "SR",
                series_number=series_index + 1, series_description=f"Series {series_index + 1}",
                sop_instance_uid=f"{study_uid}.{series_index}.{n}",
                sop_class_uid=(CTImageStorage if series_index == 0
                               else "1.2.840.10008.5.1.4.1.1.88.11"),
                instance_number=n + 1, series_date=day, content_date=day,
                content_time="120000", acquisition_date_time=f"{day}120000",
            )
            yield rec, Receipt("0" * 64, 0, ExplicitVRLittleEndian, "BULK", "bulk",
                               "2026-01-01T00:00:00Z")


class NotTheDemoStudy(ValueError):
    """The slices given to :func:`demo_nodule_seg` are not (one series of) the demo study."""


def demo_nodule_seg(folder: Path, rater: str = "Annotator^Demo",
                    shift_mm: float = 0.0) -> tuple[Dataset, int, int]:
    """The annotator's part of the demo: a DICOM-SEG labelling the 16 mm sphere as a nodule.

    Reads the CT slices in ``folder`` (the demo study as retrieved from the node:
    de-identified, any file names), thresholds the 60 HU sphere and returns a
    highdicom BINARY SEG referencing those slices, with its voxel and slice counts.
    ``rater`` is the SEG's ContentCreatorName (who drew it: a second reader is another
    name); ``shift_mm`` moves the drawn nodule along the rows, as a reader who disagrees.
    """
    import highdicom as hd
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from pydicom.sr.coding import Code

    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if ds.get("SOPClassUID") == CTImageStorage and "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise NotTheDemoStudy(f"no CT slices in {folder}")
    series = {str(ds.SeriesInstanceUID) for ds in slices}
    if len(series) > 1:
        raise NotTheDemoStudy(f"{folder} holds {len(series)} CT series: give a folder with one")
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                   for ds in slices])
    mask = (hu > 55) & (hu < 65)  # the 16 mm sphere of 60 HU
    if not mask.any():
        raise NotTheDemoStudy(f"no 60 HU sphere in the slices of {folder}: not the demo study")
    columns = round(shift_mm / float(slices[0].PixelSpacing[1]))
    if columns:
        mask = np.roll(mask, columns, axis=2)  # the sphere is far from the image's edge
    nodule = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lung nodule",
        segmented_property_category=Code("49755003", "SCT", "Morphologically Abnormal Structure"),
        segmented_property_type=Code("27925004", "SCT", "Nodule"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=slices, pixel_array=mask, segmentation_type="BINARY",
        segment_descriptions=[nodule], series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Lamina demo",
        manufacturer_model_name="lamina demo seg", software_versions="1",
        device_serial_number="1", content_creator_name=rater,
    )
    return seg, int(mask.sum()), int(mask.any(axis=(1, 2)).sum())
