"""What the index keeps, as plain values: the rows every storage backend reads and writes.

Attribute values come from the header only (``stop_before_pixels``). Field
names are DICOM keywords in snake_case so the query matcher can map a key to
a column by rule. Nothing here knows a database: the backends under
``node.storage.sqlite`` (and later ``node.storage.postgresql``) turn these
into rows, and the services above the storage layer turn them back into
their own objects (findings, masks, volumes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# --- reading values off a header ---------------------------------------------


def value_text(ds: Dataset, tag: int) -> str | None:
    """A DS/IS/UI/CS value as received, backslash-separated; None when absent or empty.

    Read from the raw bytes while the element is still undecoded: these VRs are
    ASCII by definition, and pydicom's decoding of a DS multi-value costs tens
    of microseconds, which adds up on the ingest hot path.
    """
    elem = ds._dict.get(tag)  # the lookups of ``tag in ds`` and get_item, in one
    if elem is None:
        return None
    if elem.is_raw and elem.value is None:  # deferred: get_item reads and decodes it
        elem = ds.get_item(tag)
    return element_text(elem)


def element_text(elem: Any) -> str | None:
    """:func:`value_text` of an element in hand (raw or decoded)."""
    if getattr(elem, "is_raw", False):
        if not elem.value:
            return None
        parts = elem.value.decode("ascii", "replace").split("\\")
        return "\\".join(p.strip(" \0") for p in parts) or None
    value = elem.value
    if value is None or value == "":
        return None
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return "\\".join(str(v) for v in values)


#: What :func:`_read` worked out from an undecoded element, by everything that decides
#: it (the reader, the tag, VR, bytes and byte order, and the data set's character set).
#: A series repeats its patient, study and series attributes in every instance, and
#: pydicom decoding an element (~10 µs) is most of reading a record off a header
#: stored as received. Bounded: emptied when full.
_READ: dict[tuple[Any, ...], Any] = {}
_READ_ENTRIES = 4096
_READ_BYTES = 256
_CHARSET = 0x00080005


def _read(reader: Callable[[Any], Any], ds: Dataset, keyword: str) -> Any:
    """``reader`` of the value ``ds.get(keyword)`` gives; None when absent. Remembered for
    undecoded elements of up to _READ_BYTES; a decoded element's value is read off the
    element itself (what ``ds.get`` would return, without its lookups: a de-identified
    data set holds only decoded elements)."""
    tag = tag_for_keyword(keyword)
    elem = ds._dict.get(tag)
    if elem is None:
        return None
    if not elem.is_raw:
        return reader(elem.value)
    value = elem.value
    if type(value) is not bytes or len(value) > _READ_BYTES:
        return reader(ds.get(keyword))
    charset = ds._dict.get(_CHARSET)
    key = (reader, tag, elem.VR, value, elem.is_little_endian, elem.is_implicit_VR,
           None if charset is None else charset.value if charset.is_raw
           else repr(charset.value))
    try:
        return _READ[key]
    except KeyError:
        pass
    result = reader(ds.get(keyword))
    if len(_READ) >= _READ_ENTRIES:
        _READ.clear()
    _READ[key] = result
    return result


def _uid(value: Any) -> str:
    return str(value)


def _value(value: Any) -> Any:
    return value


def _text(value: Any) -> str | None:
    """A single-valued attribute as text, or None when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _int_at(ds: Dataset, tag: int) -> int | None:
    text = value_text(ds, tag)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _floats(text: str | None, count: int) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    return values if len(values) == count else None


# --- instances ----------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRecord:
    """The index row of one instance, across the four query levels."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_instance_uid: str
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    study_id: str | None
    study_description: str | None
    referring_physician_name: str | None
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    series_date: str | None = None
    series_time: str | None = None
    content_date: str | None = None
    content_time: str | None = None
    acquisition_date_time: str | None = None

    @staticmethod
    def check_keys(ds: Dataset) -> None:
        """Raise ValueError when a key UID is missing or empty, without building a record
        (the received header is checked before its route; the record is built once,
        from what is stored). Reads the raw values: nothing is decoded."""
        for keyword, tag in _KEY_UIDS:
            if not value_text(ds, tag):
                raise ValueError(f"{keyword} is missing or empty")

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceRecord:
        """Read the indexed attributes; raises ValueError when a key UID is missing."""
        cls.check_keys(ds)
        return cls(
            patient_id=_read(_text, ds, "PatientID") or "",
            issuer_of_patient_id=_read(_text, ds, "IssuerOfPatientID") or "",
            patient_name=_read(_text, ds, "PatientName"),
            patient_birth_date=_read(_text, ds, "PatientBirthDate"),
            patient_sex=_read(_text, ds, "PatientSex"),
            study_instance_uid=_read(_uid, ds, "StudyInstanceUID"),
            study_date=_read(_text, ds, "StudyDate"),
            study_time=_read(_text, ds, "StudyTime"),
            accession_number=_read(_text, ds, "AccessionNumber"),
            study_id=_read(_text, ds, "StudyID"),
            study_description=_read(_text, ds, "StudyDescription"),
            referring_physician_name=_read(_text, ds, "ReferringPhysicianName"),
            series_instance_uid=_read(_uid, ds, "SeriesInstanceUID"),
            modality=_read(_text, ds, "Modality"),
            series_number=_read(_int, ds, "SeriesNumber"),
            series_description=_read(_text, ds, "SeriesDescription"),
            sop_instance_uid=_read(_uid, ds, "SOPInstanceUID"),
            sop_class_uid=_read(_uid, ds, "SOPClassUID"),
            instance_number=_read(_int, ds, "InstanceNumber"),
            series_date=_read(_text, ds, "SeriesDate"),
            series_time=_read(_text, ds, "SeriesTime"),
            content_date=_read(_text, ds, "ContentDate"),
            content_time=_read(_text, ds, "ContentTime"),
            acquisition_date_time=_read(_text, ds, "AcquisitionDateTime"),
        )


#: The UIDs an instance cannot be indexed without, with their tags.
_KEY_UIDS = (("StudyInstanceUID", 0x0020000D), ("SeriesInstanceUID", 0x0020000E),
             ("SOPInstanceUID", 0x00080018), ("SOPClassUID", 0x00080016))


@dataclass(frozen=True)
class Receipt:
    """Where and how an object arrived: stored with every row it produces."""

    blob_sha256: str
    blob_size: int
    transfer_syntax_uid: str
    calling_ae: str
    association_id: str
    received_at: str


@dataclass(frozen=True)
class StoredRef:
    """An indexed instance, as an annotation or a retrieve finds it."""

    sop_instance_uid: str
    blob_sha256: str
    series_instance_uid: str


@dataclass(frozen=True)
class InstanceGeometry:
    """What one instance says about where its pixels are, as kept in the index."""

    image_position_patient: str | None
    image_orientation_patient: str | None
    pixel_spacing: str | None
    rows: int | None
    columns: int | None
    frame_of_reference_uid: str | None
    number_of_frames: int | None
    acquisition_number: int | None
    number_of_series_related_instances: int | None
    images_in_acquisition: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceGeometry:
        rows, columns = _read(_value, ds, "Rows"), _read(_value, ds, "Columns")
        return cls(
            value_text(ds, 0x00200032), value_text(ds, 0x00200037), value_text(ds, 0x00280030),
            rows if isinstance(rows, int) else None,
            columns if isinstance(columns, int) else None,
            value_text(ds, 0x00200052), _int_at(ds, 0x00280008), _int_at(ds, 0x00200012),
            _int_at(ds, 0x00201209), _int_at(ds, 0x00201002),
        )

    @property
    def position(self) -> tuple[float, ...] | None:
        return _floats(self.image_position_patient, 3)

    @property
    def orientation(self) -> tuple[float, ...] | None:
        return _floats(self.image_orientation_patient, 6)

    @property
    def spacing(self) -> tuple[float, ...] | None:
        return _floats(self.pixel_spacing, 2)

    @property
    def is_slice(self) -> bool:
        """One plane with a position and orientation (not multi-frame, not SR)."""
        return (self.position is not None and self.orientation is not None
                and (self.number_of_frames or 1) == 1)


@dataclass(frozen=True)
class FindingRow:
    """A validation finding recorded against a stored instance."""

    rule: str
    severity: str  # reject | warn
    message: str
    keyword: str = ""
    tag: str = ""


# --- series -------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesRows:
    """A series' index id, its state and the geometry rows of its instances."""

    series_fk: int
    state: str | None
    last_received: float | None
    instances: list[tuple[str, int | None, InstanceGeometry]]  # (SOP UID, number, geometry)


@dataclass(frozen=True)
class SeriesFindingRow:
    """A series-level finding: its rule, severity and the slice positions it concerns."""

    rule: str
    severity: str
    message: str
    positions: tuple[float, ...] = ()


@dataclass(frozen=True)
class SeriesStateRow:
    """A series' state and its latest check, as stored."""

    state: str | None
    instances: int
    checked_at: str | None
    geometry: dict[str, Any] | None
    findings: tuple[SeriesFindingRow, ...]


# --- quarantine ---------------------------------------------------------------


@dataclass(frozen=True)
class QuarantineRow:
    """One quarantine entry: what was refused, from whom, why, and where its bytes are."""

    id: int
    received_at: str
    calling_ae: str
    address: str
    association_id: str
    status_code: int
    reason: str
    findings: list[dict[str, str]]
    sha256: str
    size: int
    area: str  # quarantine (sealed or linked bytes in the quarantine area) | blobs
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    released_at: str | None
    released_by: str | None
    release_reason: str | None
    sealed: bool
    route: str
    received_sha256: str = ""
    #: Identical sends of these bytes (one entry for all of them) and the last one's time.
    times_received: int = 1
    last_received_at: str | None = None


# --- audit --------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    """One audit event as stored: the hash covers every other field."""

    seq: int
    time: str
    actor: str
    action: str
    object: str
    outcome: str
    prev_hash: str
    hash: str


# --- annotations --------------------------------------------------------------


@dataclass(frozen=True)
class RoiRow:
    """One overlay plane's mask, cut to its bounding box and bit-packed (numpy packbits)."""

    group: int
    label: str
    slice_index: int
    row0: int
    col0: int
    rows: int
    cols: int
    bits: bytes


@dataclass(frozen=True)
class StructureRow:
    """One structure of an annotation check: its label, class and measures."""

    structure_id: str
    label: str
    class_key: str | None
    category: str | None  # JSON {value, scheme, meaning}
    type: str | None
    voxels: int
    volume_mm3: float
    max_diameter_mm: float
    first_slice: int | None  # 1-based
    last_slice: int | None
    slice_count: int
    provenance: str


@dataclass(frozen=True)
class AnnotationFindingRow:
    """One consistency finding of an annotation check, with the slices it names (JSON)."""

    check_name: str
    structure_id: str
    label: str
    slices: str
    detail: str


#: Annotation reads come back as plain mappings of column name to value: the CLI
#: prints and serialises them as they are.
Row = dict[str, Any]


# --- reviewers and signatures (issue 10 §4) -----------------------------------


@dataclass(frozen=True)
class UserRow:
    """A reviewer: ``id`` is the row number (never reused), ``user_id`` the name they sign as."""

    id: int
    user_id: str
    printed_name: str
    rater_ids: tuple[str, ...]
    public_key: bytes
    private_key: bytes
    failed_attempts: int
    locked_at: str | None
    disabled_at: str | None
    created_at: str


@dataclass(frozen=True)
class SignatureRow:
    """One electronic signature as stored: ``manifest`` is the exact canonical JSON signed."""

    id: int
    annotation_id: int
    user_fk: int
    decision: str
    meaning: str
    signed_at: str
    manifest: str
    signature: bytes
# --- agreement (issue 10) ------------------------------------------------------


@dataclass(frozen=True)
class AgreementStructureRow:
    """One structure of a comparison of two readings: a matched pair, or one rater's only."""

    class_key: str
    structure_a: str | None
    structure_b: str | None
    answer_a: str  # categorical answer (SEG type code) or '(absent)'
    answer_b: str
    question: str  # the SEG category the answers belong to
    classes_differ: bool
    dice: float | None
    jaccard: float | None
    hausdorff_mm: float | None
    hd95_mm: float | None
    volume_a_mm3: float | None
    volume_b_mm3: float | None


@dataclass(frozen=True)
class RatingRow:
    """One rater's categorical answer about one item (a study or an instance)."""

    question: str
    item: str  # 'study:<uid>' | 'instance:<uid>'
    study_uid: str
    rater: str
    answer: str
    source: str
