"""The de-identification engine: one pure function from a dataset to a de-identified
dataset plus the re-identification entries to record.

Pure means no I/O, no clock, no randomness: every replacement comes from the project
key, so the same input gives byte-identical output and a resend from the PACS stays
an idempotent resend. The engine builds a new dataset element by element instead of
deleting from a copy, so that whatever it does not decide to keep is simply never
written (whitelist thinking), at every depth of every sequence.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from types import MappingProxyType
from typing import Any

import numpy as np
from pydicom import config
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, UID_dictionary
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, IS, DSdecimal, DSfloat, PersonName

from node import __version__
from node.anonymize.descriptions import (
    DESCRIPTOR_KEYWORDS,
    SERIES_LEVEL_KEYWORDS,
    Vocabulary,
    describe,
)
from node.anonymize.evidence import (
    ADDED,
    AGE_CAPPED,
    CLEANED,
    CURVES_CLEANED,
    CURVES_REMOVED,
    DATE_SHIFTED,
    DUMMY,
    EMPTIED,
    KEPT,
    OVERLAYS_CLEANED,
    OVERLAYS_REMOVED,
    PSEUDONYM,
    REMOVED,
    UID_REMAPPED,
    AppliedOption,
    DeidEvidence,
    KeptPrivate,
    build_evidence,
    element_name,
)
from node.anonymize.keys import PSEUDONYM_PREFIX, ProjectKey
from node.anonymize.profile import (
    BASIC_PROFILE_CODE,
    CLASS_UID_KEYWORDS,
    CLEAN_PIXEL_DATA_CODE,
    OPTION_CODES,
    SAFE_TEXT_KEYWORDS,
    USER_TEXT_CS_KEYWORDS,
    keyword_tags,
    plan,
)
from node.anonymize.settings import DeidSettings, SafePrivateTag
from node.anonymize.temporal import (
    TIMES_SHIFTED,
    TemporalOffset,
    partner_time_tag,
    shift_values,
)
from node.anonymize.textscan import REPLACEMENT, TextMatcher, clean_text

# A UID that names this implementation in file meta, derived from a fixed name so it
# is the same on every machine without Lamina owning an OID root.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:lamina:implementation').int}"
IMPLEMENTATION_VERSION_NAME = f"LAMINA_{__version__.replace('.', '_')}"[:16]

_TEXT_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UR", "UT", "PN"})
# Value representations that cannot carry text: kept elements of these VRs are copied
# as the raw bytes read, never decoded, which is most of the engine's speed.
_INERT_VRS = frozenset({
    "AT", "DS", "FD", "FL", "IS", "OB", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV",
    "UL", "US", "UV", "US or SS", "OB or OW", "US or OW", "US or SS or OW",
})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_DUMMY = {
    "AE": "ANONYMOUS", "CS": "ANONYMOUS", "LO": "ANONYMOUS", "LT": "ANONYMOUS",
    "PN": "ANONYMOUS^", "SH": "ANONYMOUS", "ST": "ANONYMOUS", "UC": "ANONYMOUS",
    "UT": "ANONYMOUS", "DA": "19000101", "DT": "19000101000000", "TM": "000000",
    "DS": "0", "IS": "0", "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0,
    "US": 0, "UV": 0,
}
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)+")
_AGE_RE = re.compile(r"(\d{3})([DWMY])")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
# Kept values of these VRs are scanned for the object's names and identifiers
# (textscan): code strings lose the values that match, free text the matching words,
# AE titles and URIs that match are emptied.
_FREE_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})
_MAX_LENGTH = {"SH": 16, "LO": 64, "ST": 1024, "UC": None, "LT": 10240, "UT": None}
_OVERLAY_GROUPS = range(0x6000, 0x6020, 2)
# How times were handled, per retain_longitudinal, for the evidence.
_TEMPORAL = MappingProxyType({
    "modified": "shifted",  # dates and times moved by one per-patient offset
    "off": "table",         # dates and times as Table E.1-1's actions say
    "full": "kept",         # dates and times kept as they were
})
_CURVE_GROUPS = range(0x5000, 0x5020, 2)
_PSEUDONYM_CACHE = 65536  # UIDs whose pseudonyms an engine keeps (a few MB at most)
_DECODED_BYTES = 256  # longer undecoded values are decoded each time, never remembered
# Decoded value types that cannot be changed in place (pydicom's own str, int and float
# subclasses included): an element holding one can be shared between calls.
_IMMUTABLE_VALUES = frozenset({str, bytes, int, float, UID, PersonName, DSfloat, DSdecimal, IS})
# Element results an engine remembers (Deidentifier._results): a series' repeated
# header is a few dozen of them; per-instance values (SOP Instance UID, positions,
# times) push the oldest out when it is full (emptied, as the caches above).
_RESULTS = 8192
# Evidence an engine remembers (Deidentifier._evidences): one per distinct outcome, a
# handful per project.
_EVIDENCES = 256
# A value starting with an item tag, little and big endian: a sequence sent as UN or in
# implicit VR, which the walk enters rather than remembers.
_ITEM_STARTS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")

# Plain ints, as the walk's tags are: comparing with a pydicom BaseTag calls its
# Python-level __eq__, which was a tenth of the engine's time.
_SEGMENT_LABEL = int(Tag("SegmentLabel"))
_CONTENT_CREATOR = int(Tag("ContentCreatorName"))
# Overlay elements an annotator writes as the annotation's content (per overlay group).
_OVERLAY_TEXT_ELEMENTS = frozenset({0x0022, 0x1500})  # OverlayDescription, OverlayLabel
_PATIENT_ID = Tag("PatientID")
_PATIENT_NAME = Tag("PatientName")
_PIXEL_DATA = Tag("PixelData")
_MEDIA_INSTANCE = Tag("MediaStorageSOPInstanceUID")

# Evidence for what the engine writes itself after walking the dataset: the
# pseudonymous patient and the de-identification markers replace whatever the
# walk noted for them (and, for the code sequence, inside them).
_OVERRIDDEN = MappingProxyType({
    _PATIENT_ID: PSEUDONYM,
    _PATIENT_NAME: PSEUDONYM,
    Tag("PatientIdentityRemoved"): ADDED,
    Tag("DeidentificationMethod"): ADDED,
    Tag("DeidentificationMethodCodeSequence"): ADDED,
    Tag("LongitudinalTemporalInformationModified"): ADDED,
})
# File meta elements of the source and what the rebuilt meta does with them; any
# other source meta element is not carried over (MediaStorageSOPInstanceUID is
# remapped like SOPInstanceUID).
_META_EVIDENCE = MappingProxyType({  # by plain int, as _SEGMENT_LABEL
    int(Tag("FileMetaInformationVersion")): KEPT,
    int(Tag("MediaStorageSOPClassUID")): KEPT,
    int(Tag("TransferSyntaxUID")): KEPT,
    int(Tag("ImplementationClassUID")): DUMMY,
    int(Tag("ImplementationVersionName")): DUMMY,
})

# SOP classes whose pixels commonly carry burned-in text (ultrasound screens,
# secondary and screen captures).
_BURNED_IN_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound (retired)",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced Ultrasound Volume",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame (retired)",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
}
_SCREEN_CONVERSION_TYPES = {"WSD": "workstation screen capture", "SD": "scanned document"}


class DeidentificationError(ValueError):
    """The dataset cannot be de-identified as it stands (the message names no PHI)."""


class BurnedInTextRisk(DeidentificationError):
    """The pixels may carry burned-in text; the object belongs in quarantine."""


@dataclass(frozen=True)
class PatientEntry:
    """Re-identification entry for the patient of one object."""

    pseudonym_id: str
    pseudonym_name: str
    original_id: str
    original_name: str
    issuer: str
    date_offset_days: int
    time_offset_minutes: int = 0


@dataclass(frozen=True)
class UidEntry:
    """Re-identification entry for one replaced UID."""

    pseudonym_uid: str
    original_uid: str


ReidEntry = PatientEntry | UidEntry


@dataclass(frozen=True)
class DeidResult:
    """The de-identified dataset (file meta rebuilt, preamble zeroed) and what the
    re-identification map must record for it."""

    dataset: Dataset
    entries: tuple[ReidEntry, ...]
    pixels_masked: bool
    evidence: DeidEvidence


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def parse_un_uids(value: Any) -> list[str] | None:
    """The UIDs in the bytes of a UN element, or None if it holds anything else."""
    if not isinstance(value, bytes):
        return None
    try:
        parts = [p.strip() for p in value.decode("ascii").strip("\x00 ").split("\\")]
    except UnicodeDecodeError:
        return None
    if all(_UID_RE.fullmatch(p) and len(p) <= 64 for p in parts):
        return parts
    return None


def encode_un_uids(uids: list[str]) -> bytes:
    """UN element bytes for UIDs, padded to even length as UI values are."""
    data = "\\".join(uids).encode("ascii")
    return data + b"\x00" * (len(data) % 2)


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _new(elem: DataElement, value: Any) -> DataElement:
    return DataElement(
        elem.tag, elem.VR, value,
        is_undefined_length=elem.is_undefined_length,
        validation_mode=config.IGNORE,
    )


class _Result:
    """What the engine did with one undecoded element, to be done again for the same
    element (same key, :meth:`Deidentifier._result_key`) without working it out: the
    output element's parts, and the evidence notes, residual-PHI hits and UID pairs
    it recorded on its call, replayed on another call under that call's path."""

    __slots__ = ("hits", "kind", "notes", "uids", "undefined_length", "validation_mode",
                 "value", "vr")

    _NONE, _SINGLE, _MULTI = range(3)

    def __init__(self, kind: int, out: DataElement | None, notes: tuple[tuple[str, int], ...],
                 hits: tuple[int, ...], uids: tuple[tuple[str, str], ...]) -> None:
        self.kind = kind
        self.notes, self.hits, self.uids = notes, hits, uids
        self.vr = self.value = self.validation_mode = None
        self.undefined_length = False
        if out is not None:
            self.vr, self.validation_mode = out.VR, out.validation_mode
            self.undefined_length = out.is_undefined_length
            self.value = tuple(out.value) if kind == self._MULTI else out.value

    @classmethod
    def of(cls, new: DataElement | RawDataElement | None, raw: RawDataElement, call: _Call,
           notes_from: int, hits_from: int, uids: list[tuple[str, str]]) -> _Result | None:
        """The result to remember, or None when it must be worked out each time: it
        entered a sequence (notes under a longer path), or its value is one that
        could be changed in place or that pydicom would not give back equal."""
        prefix = call.prefix
        notes = call.notes[notes_from:]
        hits = call.residual[hits_from:]
        if any(p != prefix for _, p, _ in notes) or any(p != prefix for p, _ in hits):
            return None
        if new is None:
            kind, out = cls._NONE, None
        elif not isinstance(new, DataElement) or new.VR == "SQ" or new.tag != raw.tag:
            return None
        elif new.value is None or type(new.value) in _IMMUTABLE_VALUES:
            kind, out = cls._SINGLE, new
        elif type(new.value) is MultiValue and all(type(v) in (str, UID) for v in new.value):
            # Rebuilt from its strings on replay: pydicom converts str and UID items
            # back to equal items, as it did when the engine first built it.
            kind, out = cls._MULTI, new
        else:
            return None
        return cls(kind, out, tuple((c, t) for c, _, t in notes), tuple(t for _, t in hits),
                   tuple(uids))

    def replay(self, raw: RawDataElement, call: _Call) -> DataElement | None:
        """Record on ``call`` what the first call recorded, and return a new output
        element equal to the first one (never that one: the caller owns its output)."""
        prefix = call.prefix
        if self.notes:
            call.notes.extend([(c, prefix, t) for c, t in self.notes])
        for t in self.hits:
            call.residual.append((prefix, t))
        for old, new in self.uids:
            call.uids[old] = new
        if self.kind == self._NONE:
            return None
        if self.kind == self._SINGLE:
            return DataElement(raw.tag, self.vr, self.value,
                               is_undefined_length=self.undefined_length,
                               already_converted=True, validation_mode=self.validation_mode)
        return DataElement(raw.tag, self.vr, list(self.value),
                           is_undefined_length=self.undefined_length,
                           validation_mode=self.validation_mode)


def _charset_key(ds: Dataset) -> str:
    """The character set pydicom decodes ``ds``'s text elements with (what
    ``Dataset.__getitem__`` passes on), as a key for remembered decodings."""
    return repr(ds.original_character_set or ds._character_set)


def _one_or_many(values: list[Any]) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _value_of(ds: Dataset, tag: int) -> Any:
    """The value of ``ds``'s element ``tag``, None when it has none, as
    ``ds.get(keyword)`` gives it."""
    elem = ds.get(tag)
    return None if elem is None else elem.value


def burned_in_risk(ds: Dataset, settings: DeidSettings, *,
                   read: Callable[[Dataset, int], Any] = _value_of) -> str | None:
    """A plain-words reason why this object must be quarantined for burned-in text,
    or None. Under the ``mask`` policy an object that the configured regions can
    clean carries no risk (the engine masks it); one they cannot is still refused.
    ``read`` gives an element's value (the engine's reads it without decoding the
    caller's element in place, so its walk still finds the element as read)."""
    if settings.burned_in_policy == "accept" or _PIXEL_DATA not in ds:
        return None
    reason = _burned_in_reason(ds, read)
    if reason is None or settings.burned_in_policy == "quarantine":
        return reason
    problem = _mask_problem(ds, settings)
    return None if problem is None else f"{reason}; masking is not possible: {problem}"


def _burned_in_reason(ds: Dataset, read: Callable[[Dataset, int], Any] = _value_of) -> str | None:
    flag = str(read(ds, 0x00280301) or "").strip().upper()  # BurnedInAnnotation
    if flag == "YES":
        return "BurnedInAnnotation is YES: the pixels carry burned-in text"
    if flag == "NO":
        return None
    sop_class = str(read(ds, 0x00080016) or "")  # SOPClassUID
    if sop_class in _BURNED_IN_CLASSES:
        return (
            f"{_BURNED_IN_CLASSES[sop_class]} images often carry burned-in text "
            "and BurnedInAnnotation is not NO"
        )
    if str(read(ds, 0x00080060) or "").strip().upper() == "US":  # Modality
        return "ultrasound images often carry burned-in text and BurnedInAnnotation is not NO"
    conversion = str(read(ds, 0x00080064) or "").strip().upper()  # ConversionType
    if conversion in _SCREEN_CONVERSION_TYPES:
        return (
            f"a {_SCREEN_CONVERSION_TYPES[conversion]} often carries burned-in text "
            "and BurnedInAnnotation is not NO"
        )
    return None


def _mask_problem(ds: Dataset, settings: DeidSettings) -> str | None:
    """Why the configured regions cannot mask this object, or None if they can."""
    if ds[_PIXEL_DATA].is_undefined_length:
        return "the pixel data is compressed"
    if int(ds.get("BitsAllocated", 0) or 0) not in (8, 16, 32):
        return "only 8, 16 or 32 bits allocated can be masked"
    if "422" in str(ds.get("PhotometricInterpretation", "")) or "420" in str(
        ds.get("PhotometricInterpretation", "")
    ):
        return "subsampled colour pixel data cannot be masked"
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not any(r.applies_to(rows, columns) for r in settings.mask_regions):
        return f"no mask region is configured for {columns}x{rows} images"
    return None


def _mask_pixels(ds: Dataset, settings: DeidSettings) -> None:
    """Blank the configured regions in native pixel data, in place on ``ds``."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    dtype = np.dtype(f"<u{int(ds.BitsAllocated) // 8}")
    count = rows * columns * samples * frames
    pixels = np.frombuffer(ds.PixelData, dtype=dtype, count=count).copy()
    if samples > 1 and int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        view = pixels.reshape(frames, samples, rows, columns)
    else:
        view = pixels.reshape(frames, rows, columns, samples).transpose(0, 3, 1, 2)
    for region in settings.mask_regions:
        if region.applies_to(rows, columns):
            view[:, :, region.y:region.y + region.height, region.x:region.x + region.width] = 0
    raw = pixels.tobytes()
    ds.PixelData = raw + b"\x00" * (len(raw) % 2)


class _Call:
    """State of one deidentify() call: the patient's shift, the UIDs replaced, the
    matcher of the names and identifiers the object carries, which no kept text
    value may contain, and the notes the evidence is built from (tags and paths
    only, never values)."""

    __slots__ = ("charsets", "keep_uid", "matcher", "matcher_key", "notes", "offset",
                 "offset_key", "prefix", "private_kept", "private_kept_creators",
                 "private_seen", "residual", "uid_log", "uids")

    def __init__(self, offset: TemporalOffset, matcher: TextMatcher,
                 keep_uid: Callable[[str], bool] | None = None) -> None:
        self.offset = offset
        self.matcher = matcher
        self.keep_uid = keep_uid
        self.uids: dict[str, str] = {}
        # Evidence: (category, path prefix, tag) per decision; the prefix is the
        # sequence path being walked ("Keyword>Keyword>", "" at the top level).
        self.notes: list[tuple[str, str, int]] = []
        self.prefix = ""
        self.private_seen = 0
        self.private_kept: list[KeptPrivate] = []
        self.private_kept_creators = 0
        self.residual: list[tuple[str, int]] = []
        # The character set of each dataset walked (by id: they live as long as the call).
        self.charsets: dict[int, str] = {}
        # What the remembered element results (Deidentifier._results) depend on besides
        # the element itself: the matcher's pattern (text) and the patient's shift (dates).
        self.matcher_key = matcher.key
        self.offset_key = (offset.days, offset.minutes)
        # While an element's result is worked out to be remembered: every (original,
        # pseudonym) UID pair it used, including pairs this call had already made.
        self.uid_log: list[tuple[str, str]] | None = None

    def note(self, category: str, tag: int) -> None:
        self.notes.append((category, self.prefix, tag))

    def hit(self, tag: int) -> None:
        """The residual-PHI scan cleaned this element's value."""
        self.residual.append((self.prefix, tag))

    def names_someone(self, value: Any) -> bool:
        """Residual-PHI scan: does a value about to be kept name a person or an
        identifier of the object? This catches identity typed into fields no table
        can foresee (a name in a code string, an ID in a kept description)."""
        return bool(self.matcher) and any(self.matcher.search(str(v)) for v in _values(value))


def clean_kept_text(value: str, call: _Call) -> str:
    """The kept-text cleaner of annotators' labels: the one text scan
    (:func:`node.anonymize.textscan.clean_text`) with this object's matcher."""
    return clean_text(value, call.matcher) if call.matcher else value


class Deidentifier:
    """Applies PS3.15 Annex E with the project's options and keyed pseudonyms.

    Construct once per settings and key (resolving the profile is the costly part),
    then call :meth:`deidentify` for every object; instances are thread-safe because
    each call keeps its state in a local object."""

    def __init__(self, settings: DeidSettings, key: ProjectKey, *,
                 text_scan: bool = True, keep_annotation_text: bool = False) -> None:
        """``text_scan=False`` skips the residual-PHI scan of kept text; it exists
        only so ``benchmarks/anonymize.py`` can measure what the scan costs.

        ``keep_annotation_text``: the annotator route's engine. Segment and overlay
        labels, overlay descriptions and ContentCreatorName are the annotation's content
        (how Horos ROIs are told apart, who the rater is): kept, with the object's
        names and identifiers cleaned out of them (:meth:`_annotation_text`), never removed."""
        self._settings = settings
        self._text_scan = text_scan
        self._key = key
        self._keep_annotation_text = keep_annotation_text
        self._plan = plan(settings)
        self._basic = plan(DeidSettings(retain_longitudinal="off")).by_tag
        self._safe_text = keyword_tags(SAFE_TEXT_KEYWORDS)
        self._class_uids = keyword_tags(CLASS_UID_KEYWORDS)
        self._user_cs = keyword_tags(USER_TEXT_CS_KEYWORDS)
        self._vocabulary = frozenset(v.casefold() for v in settings.safe_descriptors)
        self._descriptors = (
            keyword_tags(DESCRIPTOR_KEYWORDS) if settings.descriptions == "vocabulary"
            else frozenset()
        )
        self._series_descriptors = keyword_tags(SERIES_LEVEL_KEYWORDS)
        self._terms = Vocabulary(settings.description_terms)
        # Attributes kept under an option are no source of names to scan for: they
        # would match themselves (an institution name kept under its option).
        # The rater's own name (ContentCreatorName, kept on the annotator route) is no
        # source either: it would be cleaned out of itself.
        self._scan_skip = frozenset(
            t for t, a in self._plan.by_tag.items() if a in ("K", "C")
            and _dictionary_vr(t) != "PN"
        ) | (frozenset({_CONTENT_CREATOR}) if keep_annotation_text else frozenset())
        self._date_action = {"off": "X", "full": "K", "modified": "C"}[
            settings.retain_longitudinal
        ]
        self._graphics_kept = self._plan.overlay.get(0x3000) == "C"
        self._curves_kept = self._plan.curve == "C"
        self._private_kept = self._plan.private == "C"
        self._options = (
            _applied("basic_profile", BASIC_PROFILE_CODE),
            *(_applied(o, OPTION_CODES[o]) for o in self._plan.options),
        )
        # Evidence: per tag, its name and the option that keeps it (filled lazily;
        # concurrent fills write the same value).
        self._tag_cache: dict[int, tuple[str, str | None]] = {}
        # The action table compiled per (tag, VR) as the walk meets them: the table
        # lookup and the VR rule run once per process, not once per element (filled
        # lazily; concurrent fills write the same value).
        self._actions: dict[tuple[int, str], str] = {}
        # Pseudonyms of the UIDs met, kept across calls: a series repeats its study,
        # series and frame-of-reference UIDs in every instance, and the keyed hash is
        # a pure function of the key, so a cached pseudonym is the same pseudonym.
        # Bounded: emptied when full rather than grown without end (thread-safe as
        # the caches above: a concurrent fill writes the same value).
        self._pseudonyms: dict[str, str] = {}
        # pydicom's decoding of undecoded elements a series repeats, only ever read
        # (see _decoded); bounded like the pseudonyms.
        self._decoded_cache: dict[tuple[Any, ...], DataElement] = {}
        # What the walk did with undecoded elements a series repeats (see
        # _result_key); bounded and thread-safe like the caches above.
        self._results: dict[tuple[Any, ...], _Result] = {}
        # The text scan's terms of the sequences a series repeats, by their bytes
        # (TextMatcher.from_dataset).
        self._sequence_terms: dict[tuple[Any, ...], tuple[str, ...]] = {}
        self._markers = {masked: self._marker_values(masked) for masked in (False, True)}
        if not all(text.isascii() for values in self._markers.values()
                   for text in (values[0], *values[1], values[3],
                                *(v for c in values[2] for v in (c.value, c.scheme_designator,
                                                                 c.meaning)))):
            raise ValueError("de-identification markers must be ASCII")  # see _encoded_markers
        # The evidence of the calls a series repeats (see _evidence); bounded and
        # thread-safe like the caches above.
        self._evidences: dict[tuple[Any, ...], DeidEvidence] = {}
        # The markers encoded per (masked, implicit VR, little endian) (see _mark).
        self._encoded: dict[tuple[bool, bool, bool], tuple[RawDataElement, ...]] = {}

    def deidentify(self, ds: Dataset, keep_uid: Callable[[str], bool] | None = None) -> DeidResult:
        """De-identify ``ds`` (left untouched) into a new dataset.

        ``keep_uid`` names UIDs that are already our pseudonyms (an annotation
        built on a study we served): those stay, so its references still resolve.

        Raises :class:`BurnedInTextRisk` when :func:`burned_in_risk` finds a reason,
        so no caller can store an unexamined screen capture by forgetting to ask,
        and :class:`DeidentificationError` when there is no transfer syntax."""
        read = self._read
        reason = burned_in_risk(ds, self._settings, read=read)
        if reason is not None:
            raise BurnedInTextRisk(reason)
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        if "TransferSyntaxUID" not in meta:
            raise DeidentificationError("the dataset has no transfer syntax in its file meta")
        issuer = str(read(ds, 0x00100021) or "")  # IssuerOfPatientID
        original_id = str(read(ds, 0x00100020) or "")  # PatientID
        patient_key = original_id.strip()
        if not patient_key:
            # No patient ID: treat the study as its own patient rather than pooling
            # every unidentified object under one pseudonym.
            patient_key = "study:" + str(read(ds, 0x0020000D) or "")  # StudyInstanceUID
        pseudonym = self._key.patient(issuer, patient_key)
        offset = self._key.temporal_offset(issuer, patient_key)
        matcher = (TextMatcher.from_dataset(ds, skip=self._scan_skip,
                                            sequences=self._sequence_terms)
                   if self._text_scan
                   else TextMatcher(()))
        call = _Call(offset, matcher, keep_uid)

        out = self._dataset(ds, call)
        if isinstance(ds, FileDataset):
            # A deferred value kept as it is (the pixel data of a large object) is read,
            # when it is written out, from the file it was parsed from: pydicom's
            # deferred read looks for these four attributes on the holding dataset.
            out.filename, out.buffer = ds.filename, ds.buffer
            out.fileobj_type, out.timestamp = ds.fileobj_type, ds.timestamp
        out[_PATIENT_ID] = DataElement(_PATIENT_ID, "LO", pseudonym.patient_id)
        out[_PATIENT_NAME] = DataElement(_PATIENT_NAME, "PN", pseudonym.patient_name)
        masked = (self._settings.burned_in_policy == "mask"
                  and _burned_in_reason(ds, read) is not None)
        if masked:
            _mask_pixels(out, self._settings)
        self._mark(out, masked)
        out.file_meta = self._file_meta(meta, ds, call)
        out.preamble = b"\x00" * 128

        patient = PatientEntry(
            pseudonym_id=pseudonym.patient_id,
            pseudonym_name=pseudonym.patient_name,
            original_id=original_id,
            original_name=str(read(ds, 0x00100010) or ""),  # PatientName
            issuer=issuer,
            date_offset_days=offset.days,
            time_offset_minutes=offset.minutes,
        )
        uids = tuple(UidEntry(new, old) for old, new in sorted(call.uids.items()))
        return DeidResult(dataset=out, entries=(patient, *uids), pixels_masked=masked,
                          evidence=self._evidence(call, masked))

    def _evidence(self, call: _Call, masked: bool) -> DeidEvidence:
        """The evidence of the call, remembered by everything it is built from (the notes
        are tags and paths: the slices of a series repeat them)."""
        key = (masked, tuple(call.notes), tuple(call.private_kept), call.private_seen,
               call.private_kept_creators, tuple(call.residual))
        evidence = self._evidences.get(key)
        if evidence is None:
            evidence = self._build_evidence(call, masked)
            if len(self._evidences) >= _EVIDENCES:
                self._evidences.clear()
            self._evidences[key] = evidence
        return evidence

    def _build_evidence(self, call: _Call, masked: bool) -> DeidEvidence:
        options = self._options
        if masked:
            options = (options[0], _applied("clean_pixel_data", CLEAN_PIXEL_DATA_CODE),
                       *options[1:])
        return build_evidence(
            engine=f"Lamina {__version__}",
            edition=self._plan.edition,
            options=options,
            notes=call.notes,
            overridden=_OVERRIDDEN,
            option_for=self._option_for,
            tag_cache=self._tag_cache,
            private_kept=call.private_kept,
            private_removed=call.private_seen - len(call.private_kept)
            - call.private_kept_creators,
            residual=call.residual,
            pixels_masked=masked,
            temporal=_TEMPORAL[self._settings.retain_longitudinal],
        )

    def _option_for(self, tag: int) -> str | None:
        """The option that made the engine keep (clean, shift, cap) a tag rather than
        do what the basic profile does: the table's deciding column, or for tags
        outside the table the option behind the value-representation rule."""
        option = self._plan.because.get(tag)
        if option is None and tag not in self._plan.by_tag:
            if (tag >> 16) & 1:
                option = "retain_safe_private"
            else:
                vr = _dictionary_vr(tag)
                if vr in _DATE_VRS and self._date_action != "X":
                    option = ("retain_longitudinal_full_dates" if self._date_action == "K"
                              else "retain_longitudinal_modified_dates")
                elif vr == "AS" and self._settings.retain_patient_characteristics:
                    option = "retain_patient_characteristics"
                elif (vr == "UI" and self._settings.retain_uids
                      and tag not in self._class_uids):
                    option = "retain_uids"
        return option

    # -- walking -------------------------------------------------------------------

    def _dataset(self, ds: Dataset, call: _Call) -> Dataset:
        creators: dict[tuple[int, int], DataElement] = {}
        private = 0
        # The new dataset is built as the {tag: element} mapping pydicom's Dataset
        # takes, rather than by Dataset[tag] = element per element: its checks are for
        # private tags (none here; _private adds those through the API) and for
        # sequences, which are set again below so pydicom does its part for them.
        elements: dict[Any, DataElement | RawDataElement] = {}
        sequences: list[DataElement] = []
        # The elements as held (what get_item(tag, keep_deferred=True) returns, without
        # its lookup per element), not iteration: iterating a Dataset decodes every
        # element. A large value left on disk (the pixels of a big object) stays there;
        # _element reads it only if its action needs the value. An element decoded
        # meanwhile (a date's partner time) is met as decoded, as get_item would give it.
        for tag, held in ds._dict.items():
            group, element = tag >> 16, tag & 0xFFFF
            if group & 1:
                private += 1
                if 0x0010 <= element <= 0x00FF:
                    creators[(group, element)] = ds[tag]
                continue
            new = self._element(int(tag), held, ds, call)
            if new is not None:
                elements[tag] = new
                if new.VR == "SQ" and isinstance(new, DataElement):
                    sequences.append(new)
        out = Dataset(elements)
        # Same encoding as the source, so pydicom writes the raw elements copied above
        # as they are instead of decoding and re-encoding every one of them.
        implicit, little = ds.original_encoding
        out.set_original_encoding(implicit, little, ds.original_character_set)
        for sequence in sequences:
            out[sequence.tag] = sequence
        call.private_seen += private
        if self._private_kept and creators:
            self._private(ds, out, creators, call)
        return out

    def _sequence(self, elem: DataElement, call: _Call) -> DataElement:
        """A kept sequence, every item cleaned by the same rules; the evidence
        paths of what is inside it start with its keyword."""
        call.note(KEPT, elem.tag)
        outer = call.prefix
        call.prefix = f"{outer}{element_name(elem.tag)}>"
        try:
            items = Sequence(self._dataset(item, call) for item in elem.value)
        finally:
            call.prefix = outer
        return _new(elem, items)

    def _private(self, ds: Dataset, out: Dataset,
                 creators: dict[tuple[int, int], DataElement], call: _Call) -> None:
        """Private elements the project vouches for (Retain Safe Private), with the
        creator elements that give them meaning; everything else private is dropped."""
        used_blocks: set[tuple[int, int]] = set()
        for tag in ds.keys():  # noqa: SIM118
            group, element = tag >> 16, tag & 0xFFFF
            if not group & 1 or element < 0x1000:
                continue
            block = (group, element >> 8)
            creator = creators.get(block)
            entry = None if creator is None else self._safe_private(
                group, str(creator.value), element)
            if entry is None:
                continue
            new = self._vouched(ds[tag], ds, call)
            if new is not None:
                out.add(new)
                used_blocks.add(block)
                call.private_kept.append(KeptPrivate(
                    path=call.prefix + element_name(tag), creator=entry.creator,
                    element=entry.element, group=entry.group,
                ))
        for block in used_blocks:
            out.add(_new(creators[block], creators[block].value))
        call.private_kept_creators += len(used_blocks)

    def _vouched(self, elem: DataElement, parent: Dataset, call: _Call) -> DataElement | None:
        """A safe-listed private element. From implicit-VR files it arrives as UN
        bytes: UIDs in it are still remapped, anything else is kept as vouched for,
        unless it names the patient."""
        if elem.VR != "UN" or not isinstance(elem.value, bytes):
            return self._kept(elem, parent, call)
        uids = parse_un_uids(elem.value)
        if uids is not None:
            return self._un_uids(elem, call)
        if call.names_someone(elem.value.decode("latin-1")):
            call.hit(elem.tag)
            call.note(REMOVED, elem.tag)
            return None
        call.note(KEPT, elem.tag)
        return _new(elem, elem.value)

    def _safe_private(self, group: int, creator: str, element: int) -> SafePrivateTag | None:
        """The safe-list entry vouching for a private element, or None."""
        for entry in self._settings.safe_private:
            if entry.matches(group, creator, element):
                return entry
        return None

    def _element(self, tag: int, raw: DataElement | RawDataElement, parent: Dataset,
                 call: _Call) -> DataElement | RawDataElement | None:
        """The action is decided from tag and VR before the value is decoded: what
        goes is never parsed, and kept numbers and binary data are copied raw. The
        evidence is noted at the same points, from the tag alone."""
        group, element = tag >> 16, tag & 0xFFFF
        if group <= 0x0002 or element == 0x0000:
            if element:
                call.note(REMOVED, tag)  # command or file meta elements in the body
            return None  # and group lengths, which are structure, not data
        if self._keep_annotation_text and (
                tag in (_SEGMENT_LABEL, _CONTENT_CREATOR)
                or (group in _OVERLAY_GROUPS and element in _OVERLAY_TEXT_ELEMENTS)):
            return self._annotation_text(parent[tag], call)
        if group in _OVERLAY_GROUPS:
            if self._graphics_kept:
                return self._graphic(parent[tag], call, OVERLAYS_CLEANED)
            call.note(OVERLAYS_REMOVED, tag)
            return None
        if group in _CURVE_GROUPS:
            if self._curves_kept:
                return self._graphic(parent[tag], call, CURVES_CLEANED)
            call.note(CURVES_REMOVED, tag)
            return None
        key = self._result_key(tag, raw, parent, call)
        if key is None:
            return self._decide(tag, raw, parent, call)
        result = self._results.get(key)
        if result is not None:
            return result.replay(raw, call)
        return self._remember(key, tag, raw, parent, call)

    def _result_key(self, tag: int, raw: DataElement | RawDataElement, parent: Dataset,
                    call: _Call) -> tuple[Any, ...] | None:
        """The key of an element whose result can be remembered, or None.

        A series repeats most of its header in every instance, and what the walk does
        with an element (the action, the decoded value, the pseudonym, the shifted
        date, the cleaned text, the evidence notes) is a function of the element's
        tag, VR as sent, bytes, length, encoding and character set, plus, by VR, of
        the object's text matcher (text and code strings) or the patient's shift and
        a date's paired time in the same dataset (dates and times), and for
        descriptions under the vocabulary rule of the dataset's Modality and Series
        Number. Everything else it reads is the engine's own settings. Not remembered:
        elements whose result depends on other elements in other ways (Segment Label,
        ambiguous VRs, sequences), numbers and binary data, long values, decoded
        elements, and calls that keep some UIDs as they are (``keep_uid``)."""
        if call.keep_uid is not None or not isinstance(raw, RawDataElement):
            return None
        value = raw.value
        if type(value) is not bytes or len(value) > _DECODED_BYTES or tag == _SEGMENT_LABEL:
            return None
        vr = raw.VR
        if vr is None or vr == "UN":
            if value[:4] in _ITEM_STARTS:
                return None
            vr = _dictionary_vr(tag)
        if vr == "SQ" or vr in _INERT_VRS or " or " in vr:
            # Kept numbers and binary data are copied raw without remembering: that
            # costs less than a key, and their per-instance values (positions,
            # instance numbers) would only crowd the memo.
            return None
        if vr in _DATE_VRS:
            context: Any = call.offset_key
            partner = partner_time_tag(tag) if vr == "DA" else None
            if partner is not None and partner in parent:
                time = parent.get_item(partner)
                if not isinstance(time, RawDataElement) or type(time.value) is not bytes:
                    return None
                context = (context, time.VR, time.value)
        elif vr in _TEXT_VRS or vr == "CS" or vr == "UN":
            context = call.matcher_key
        else:
            context = None
        if tag in self._descriptors:
            # Described from the series' Modality and SeriesNumber when not kept
            # (node.anonymize.descriptions.describe): as read, or not remembered.
            around = (parent.get_item(0x00080060, keep_deferred=True),
                      parent.get_item(0x00200011, keep_deferred=True))
            if any(e is not None and (not isinstance(e, RawDataElement)
                                      or type(e.value) is not bytes) for e in around):
                return None
            context = (context, *((None, None) if e is None else (e.VR, e.value)
                                  for e in around))
        charset = call.charsets.get(id(parent))
        if charset is None:
            charset = call.charsets[id(parent)] = _charset_key(parent)
        return (tag, raw.VR, value, raw.length, raw.is_little_endian, raw.is_implicit_VR,
                charset, context)

    def _remember(self, key: tuple[Any, ...], tag: int, raw: RawDataElement, parent: Dataset,
                  call: _Call) -> DataElement | RawDataElement | None:
        """Work an element out as always, and remember the result when it can be."""
        notes_from, hits_from = len(call.notes), len(call.residual)
        outer = call.uid_log
        call.uid_log = uids = []
        try:
            new = self._decide(tag, raw, parent, call)
        finally:
            call.uid_log = outer
        if outer is not None:
            outer.extend(uids)
        result = _Result.of(new, raw, call, notes_from, hits_from, uids)
        if result is not None:
            if len(self._results) >= _RESULTS:
                self._results.clear()
            self._results[key] = result
        return new

    def _decide(self, tag: int, raw: DataElement | RawDataElement, parent: Dataset,
                call: _Call) -> DataElement | RawDataElement | None:
        """What the profile does with an element, from its action (the rest of
        :meth:`_element`)."""
        vr = raw.VR
        if vr is None or vr == "UN":
            vr = _dictionary_vr(tag)
        action = self._actions.get((tag, vr))
        if action is None:
            action = self._actions[(tag, vr)] = (self._plan.by_tag.get(tag)
                                                 or self._vr_rule(tag, vr))
        if tag in self._descriptors and action != "K" and not (
            action == "C" and self._in_vocabulary(parent[tag].value)
        ):
            return self._descriptor(parent[tag], parent, call)
        if action == "X":
            call.note(REMOVED, tag)
            return None
        if vr in _INERT_VRS and isinstance(raw, RawDataElement):
            if action == "K":
                call.note(KEPT, tag)
                return raw
            if action == "Z" and " or " not in vr:
                call.note(EMPTIED, tag)
                return DataElement(tag, vr, None)
        if action == "Z" and vr == "SQ":
            call.note(EMPTIED, tag)
            return DataElement(tag, vr, Sequence())
        elem = self._decoded(parent, tag, raw, call)
        if tag == _SEGMENT_LABEL:
            return self._segment_label(elem, parent, action, call)
        return self._apply(action, elem, parent, call)

    def _decoded(self, parent: Dataset, tag: int, raw: DataElement | RawDataElement,
                 call: _Call) -> DataElement:
        """``parent[tag]``, remembered for undecoded values a series repeats in every
        instance (its study, series, dates, equipment): pydicom decoding an element is
        about a third of the walk. The key is everything the decoding depends on: tag,
        VR as sent, bytes, byte order and the character set of the dataset it is
        decoded in; elements whose decoding depends on other elements (an ambiguous VR,
        private tags) and values that could be changed in place (multi-values,
        sequences) are decoded each time. A remembered element is a copy no dataset
        holds, and is only read: whatever the walk keeps leaves in a new element
        (``_new``)."""
        value = raw.value if isinstance(raw, RawDataElement) else None
        if (type(value) is not bytes or len(value) > _DECODED_BYTES or (tag >> 16) & 1
                or " or " in (raw.VR if raw.VR not in (None, "UN") else _dictionary_vr(tag))):
            return parent[tag]
        charset = call.charsets.get(id(parent))
        if charset is None:
            charset = call.charsets[id(parent)] = _charset_key(parent)
        key = (tag, raw.VR, value, raw.is_little_endian, raw.is_implicit_VR, charset)
        elem = self._decoded_cache.get(key)
        if elem is None:
            elem = parent[tag]
            if elem.value is None or type(elem.value) in _IMMUTABLE_VALUES:
                if len(self._decoded_cache) >= _PSEUDONYM_CACHE:
                    self._decoded_cache.clear()
                # A copy: the element in ``parent`` is the caller's to change.
                self._decoded_cache[key] = copy.copy(elem)
        return elem

    def _read(self, ds: Dataset, tag: int, default: Any = None) -> Any:
        """The value of ``ds``'s element ``tag`` (``default`` when absent), as
        ``ds.get(keyword, default)`` gives it, for the few elements the engine reads
        outside its walk (burned-in checks, the patient, file meta). An undecoded
        element stays undecoded in ``ds`` (``ds.get`` would decode it in place), so
        the walk still finds it as read and its remembered result
        (:meth:`_result_key`); the decoding itself is pydicom's, remembered as in
        :meth:`_decoded`."""
        raw = ds.get_item(tag)
        if raw is None:
            return default
        vr = raw.VR if raw.VR not in (None, "UN") else _dictionary_vr(tag)
        if (not isinstance(raw, RawDataElement) or type(raw.value) is not bytes
                or len(raw.value) > _DECODED_BYTES or vr == "SQ" or " or " in vr):
            return ds[tag].value  # pydicom does more for these than decode them
        charset = ds.original_character_set or ds._character_set
        key = (tag, raw.VR, raw.value, raw.is_little_endian, raw.is_implicit_VR,
               repr(charset))
        elem = self._decoded_cache.get(key)
        if elem is None:
            # What ds[tag] does for an element of a non-ambiguous VR, without storing
            # the result in ds.
            elem = convert_raw_data_element(raw, encoding=charset, ds=ds)
            if elem.value is None or type(elem.value) in _IMMUTABLE_VALUES:
                if len(self._decoded_cache) >= _PSEUDONYM_CACHE:
                    self._decoded_cache.clear()
                self._decoded_cache[key] = elem
        return elem.value

    def _vr_rule(self, tag: int, vr: str) -> str:
        """Action for an attribute the table does not name: whitelist by VR."""
        if vr == "SQ":
            return "K"
        if vr == "UI":
            return "U"
        if vr in _DATE_VRS:
            return self._date_action
        if vr == "AS":
            return "K" if self._settings.retain_patient_characteristics else "X"
        if vr in _TEXT_VRS:
            return "K" if tag in self._safe_text and vr != "PN" else "Z"
        if vr == "CS":
            return "Z" if tag in self._user_cs else "K"
        if vr == "UN":
            return "U"
        return "K"

    def _apply(self, action: str, elem: DataElement, parent: Dataset, call: _Call) -> DataElement | None:
        vr = elem.VR
        if action == "X":
            call.note(REMOVED, elem.tag)
            return None
        if action == "Z":
            call.note(EMPTIED, elem.tag)
            return _new(elem, Sequence() if vr == "SQ" else None)
        if vr == "SQ":
            return self._sequence(elem, call)
        if action == "U" or vr in ("UI", "UN"):
            return self._uids(elem, call)
        if action == "D":
            call.note(DUMMY, elem.tag)
            return _new(elem, _DUMMY.get(vr))
        if action == "C":
            if vr in _DATE_VRS:
                return self._dates(elem, parent, call) if self._date_action == "C" else self._kept(
                    elem, parent, call
                )
            if vr in _TEXT_VRS or vr == "CS":
                if self._in_vocabulary(elem.value):
                    if not call.names_someone(elem.value):
                        call.note(CLEANED, elem.tag)
                        return _new(elem, elem.value)
                    if elem.tag in self._descriptors:
                        return self._descriptor(elem, parent, call)  # counts the hit
                    call.hit(elem.tag)
                # Not provably clean: fall back to what the basic profile does.
                return self._apply(self._basic.get(elem.tag, "X"), elem, parent, call)
        return self._kept(elem, parent, call)

    def _kept(self, elem: DataElement, parent: Dataset, call: _Call) -> DataElement | None:
        """Keep an element, still remapping UIDs, shifting dates, capping ages and
        cleaning inside sequences: keeping never means skipping the rules below it."""
        vr = elem.VR
        if vr == "SQ":
            return self._sequence(elem, call)
        if vr in ("UI", "UN"):
            return self._uids(elem, call)
        if vr in _DATE_VRS and self._date_action != "K":
            if self._date_action == "C":
                return self._dates(elem, parent, call)
            call.note(REMOVED, elem.tag)
            return None
        if vr == "AS":
            return self._age(elem, call)
        value = elem.value
        if vr != "PN" and (vr in _TEXT_VRS or vr == "CS") and call.names_someone(value):
            return self._scrubbed(elem, call)
        call.note(KEPT, elem.tag)
        return _new(elem, list(value) if isinstance(value, MultiValue) else value)

    def _scrubbed(self, elem: DataElement, call: _Call) -> DataElement:
        """A kept value that names a person or identifier of the object, cleaned by
        its VR: a code string loses the values that match (emptied if none is
        left), free text the matching words, an AE title or URI its value."""
        call.hit(elem.tag)
        vr = elem.VR
        values = [str(v) for v in _values(elem.value)]
        if vr == "CS":
            left = [v for v in values if not call.matcher.search(v)]
        elif vr in _FREE_TEXT_VRS:
            limit = _MAX_LENGTH[vr]
            cleaned = (clean_text(v, call.matcher)[:limit] for v in values)
            # A value that was nothing but names goes, rather than reading "REMOVED".
            left = [c for c in cleaned if c.replace(REPLACEMENT, "").strip(" ^,.-_'")]
        else:
            left = []
        if not any(v.strip() for v in left):
            call.note(EMPTIED, elem.tag)
            return _new(elem, None)
        call.note(CLEANED, elem.tag)
        return _new(elem, _one_or_many(left))

    def _descriptor(self, elem: DataElement, parent: Dataset, call: _Call) -> DataElement:
        """Study/Series Description and the like under ``descriptions = "vocabulary"``:
        kept when every token is vocabulary, else the neutral text of
        :func:`node.anonymize.descriptions.describe`."""
        value = " ".join(str(v) for v in _values(elem.value))
        text, kept = describe(value, self._terms, call.matcher, parent,
                              series_level=elem.tag in self._series_descriptors)
        if kept:
            call.note(CLEANED, elem.tag)
            return _new(elem, elem.value)
        if call.names_someone(value):
            call.hit(elem.tag)
        call.note(DUMMY, elem.tag)
        return _new(elem, text or None)

    # -- value rules -----------------------------------------------------------------

    def _uids(self, elem: DataElement, call: _Call) -> DataElement | None:
        if elem.tag in self._class_uids or self._settings.retain_uids:
            call.note(KEPT, elem.tag)
            return _new(elem, elem.value)
        if elem.VR == "UN":
            return self._un_uids(elem, call)
        originals = [str(v) for v in _values(elem.value)]
        values = [self._uid(v, call) for v in originals]
        changed = any(
            new != old.strip("\x00 ") for new, old in zip(values, originals, strict=True)
        )
        call.note(UID_REMAPPED if changed else KEPT, elem.tag)
        return _new(elem, _one_or_many(values))

    def _uid(self, value: str, call: _Call) -> str:
        value = value.strip("\x00 ")
        if not value or value in UID_dictionary or value.startswith("1.2.840.10008."):
            return value
        if call.keep_uid is not None and call.keep_uid(value):
            return value
        new = call.uids.get(value)
        if new is None:
            new = self._pseudonyms.get(value)
            if new is None:
                if len(self._pseudonyms) >= _PSEUDONYM_CACHE:
                    self._pseudonyms.clear()
                new = self._pseudonyms[value] = self._key.uid(value)
            call.uids[value] = new
        if call.uid_log is not None:
            call.uid_log.append((value, new))
        return new

    def _un_uids(self, elem: DataElement, call: _Call) -> DataElement | None:
        """An element of unknown VR survives only if it holds UIDs, remapped: that is
        how UI elements of unknown tags arrive from implicit-VR files."""
        uids = parse_un_uids(elem.value)
        if uids is None:
            call.note(REMOVED, elem.tag)
            return None
        values = [self._uid(u, call) for u in uids]
        call.note(UID_REMAPPED if values != uids else KEPT, elem.tag)
        return _new(elem, encode_un_uids(values))

    def _dates(self, elem: DataElement, parent: Dataset, call: _Call) -> DataElement | None:
        """A DA, TM or DT moved by the patient's offset (node.anonymize.temporal); a
        DA moves with its paired TM when that time is shifted too."""
        values = [str(v) for v in _values(elem.value)]
        times = None
        partner = partner_time_tag(elem.tag) if elem.VR == "DA" else None
        if partner is not None and partner in parent and self._shifted(partner):
            times = [str(v) for v in _values(parent[partner].value)]
        shifted = shift_values(elem.VR, values, call.offset, times=times)
        if shifted is None:
            call.note(EMPTIED, elem.tag)
            return _new(elem, None)  # unreadable date or time: emptied, never kept
        call.note(DATE_SHIFTED if shifted != values else KEPT, elem.tag)
        return _new(elem, _one_or_many(shifted))

    def _shifted(self, tag: int) -> bool:
        """Is this (TM) tag shifted rather than removed, emptied or kept?"""
        action = self._plan.by_tag.get(tag) or self._vr_rule(tag, "TM")
        return action == "C" and self._date_action == "C"

    def _age(self, elem: DataElement, call: _Call) -> DataElement:
        """Ages above 89 years become 090Y (HIPAA Safe Harbor groups them)."""
        ages = []
        capped = False
        for value in _values(elem.value):
            match = _AGE_RE.fullmatch(str(value).strip())
            if match is None:
                call.note(EMPTIED, elem.tag)
                return _new(elem, None)
            days = int(match[1]) * _DAYS_PER_UNIT[match[2]]
            over = days / 365.25 >= 90
            capped |= over and match[0] != "090Y"
            ages.append("090Y" if over else match[0])
        call.note(AGE_CAPPED if capped else KEPT, elem.tag)
        return _new(elem, _one_or_many(ages))

    def _in_vocabulary(self, value: Any) -> bool:
        values = _values(value)
        return bool(values) and all(str(v).strip().casefold() in self._vocabulary for v in values)

    def _graphic(self, elem: DataElement, call: _Call, kept_as: str) -> DataElement | None:
        """Overlay and curve elements under Clean Graphics: geometry and bits stay,
        text (labels, descriptions, comments) only if it is project vocabulary."""
        call.note(kept_as, elem.tag)
        if elem.VR in _TEXT_VRS or elem.VR == "UN":
            if self._in_vocabulary(elem.value):
                if not call.names_someone(elem.value):
                    call.note(CLEANED, elem.tag)
                    return _new(elem, elem.value)
                call.hit(elem.tag)
            call.note(REMOVED, elem.tag)
            return None
        value = elem.value
        return _new(elem, list(value) if isinstance(value, MultiValue) else value)

    def _annotation_text(self, elem: DataElement, call: _Call) -> DataElement:
        """An annotator's label kept, through the one kept-text cleaner."""
        values = [clean_kept_text(str(v), call) for v in _values(elem.value)]
        if any(v != str(o) for v, o in zip(values, _values(elem.value), strict=True)):
            call.hit(elem.tag)
            call.note(CLEANED, elem.tag)
        else:
            call.note(KEPT, elem.tag)
        if elem.tag == _SEGMENT_LABEL and not any(values):  # Type 1: never left empty
            return _new(elem, "Segment")
        return _new(elem, _one_or_many(values) if values else None)

    def _segment_label(
        self, elem: DataElement, parent: Dataset, action: str, call: _Call
    ) -> DataElement:
        """Segment Label is Type 1 and free text. It stays when it says no more than
        the segment's coded property type, or is project vocabulary under Clean
        Descriptors; otherwise it becomes "Segment <number>"."""
        label = str(elem.value or "").strip().casefold()
        meanings = {
            str(item.get("CodeMeaning", "")).strip().casefold()
            for item in parent.get("SegmentedPropertyTypeCodeSequence", [])
        }
        coded = label in meanings
        known = coded or (action in ("C", "K") and label in self._vocabulary)
        if label and known:
            if not call.names_someone(elem.value):
                call.note(KEPT if coded else CLEANED, elem.tag)
                return _new(elem, elem.value)
            call.hit(elem.tag)
        call.note(DUMMY, elem.tag)
        return _new(elem, f"Segment {parent.get('SegmentNumber', '')}".strip())

    # -- markers and file meta -------------------------------------------------------

    def _mark(self, out: Dataset, masked: bool) -> None:
        """The de-identification markers, the same for every object of an engine.

        Where the output's encoding is known (read from a file), they go in as the
        undecoded elements of the bytes pydicom wrote for them in that encoding,
        worked out once (:meth:`_encoded_markers`): an undecoded element is an
        immutable tuple, so every output can hold the same ones, pydicom writes them
        out as they are and decodes one into the caller's own element if it is read
        (building them per object was a tenth of the engine's time per CT header)."""
        implicit, little = out.original_encoding
        if implicit is None or little is None:
            for elem in self._marker_elements(masked):
                out[elem.tag] = elem
            return
        encoded = self._encoded.get((masked, implicit, little))
        if encoded is None:
            encoded = self._encoded[(masked, implicit, little)] = self._encoded_markers(
                masked, implicit, little)
        for raw in encoded:
            out[raw.tag] = raw

    def _marker_elements(self, masked: bool) -> list[DataElement]:
        """The markers as elements, by tag and VR, without pydicom's value validation
        (the values are the engine's own constants)."""
        identity, method, codes, temporal = self._markers[masked]
        return [
            DataElement(0x00120062, "CS", identity,  # PatientIdentityRemoved
                        validation_mode=config.IGNORE),
            DataElement(0x00120063, "LO", list(method),  # DeidentificationMethod
                        validation_mode=config.IGNORE),
            DataElement(0x00120064, "SQ",  # DeidentificationMethodCodeSequence
                        Sequence(_code_item(c) for c in codes), validation_mode=config.IGNORE),
            DataElement(0x00280303, "CS", temporal,  # LongitudinalTemporalInformationModified
                        validation_mode=config.IGNORE),
        ]

    def _encoded_markers(self, masked: bool, implicit: bool,
                         little: bool) -> tuple[RawDataElement, ...]:
        """The markers as pydicom's writer encodes them in this encoding, as undecoded
        elements that it writes back to the same bytes (write_data_element writes an
        undecoded value as it is, under the same tag, VR and length). The values are
        ASCII, which every DICOM character set encodes alike, so the bytes do not
        depend on the output's Specific Character Set."""
        encoded = []
        for elem in self._marker_elements(masked):
            buffer = DicomBytesIO()
            buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
            write_data_element(buffer, elem, default_encoding)
            written = buffer.getvalue()
            head = 8 if implicit or elem.VR not in EXPLICIT_VR_LENGTH_32 else 12
            encoded.append(RawDataElement(BaseTag(elem.tag), None if implicit else elem.VR,
                                          len(written) - head, written[head:], 0, implicit,
                                          little))
        return tuple(encoded)

    def _marker_values(self, masked: bool) -> tuple[str, tuple[str, ...], tuple[Any, ...], str]:
        codes = [BASIC_PROFILE_CODE]
        if masked:
            codes.append(CLEAN_PIXEL_DATA_CODE)
        codes += [OPTION_CODES[o] for o in self._plan.options]
        method = (f"Lamina {__version__} PS3.15 E.1-1 {self._plan.edition}",
                  *(code.meaning for code in codes[1:]),
                  *([TIMES_SHIFTED] if self._date_action == "C" else []))
        temporal = {"off": "REMOVED", "full": "UNMODIFIED", "modified": "MODIFIED"}[
            self._settings.retain_longitudinal]
        return "YES", method, tuple(codes), temporal

    def _file_meta(self, source: FileMetaDataset, ds: Dataset, call: _Call) -> FileMetaDataset:
        """New file meta: only what identifies the object's kind and encoding. Source
        and sending AE titles and private meta information are not carried over."""
        # Built as the {tag: element} mapping FileMetaDataset takes, elements by tag
        # and VR without pydicom's value validation (most of the cost of add_new):
        # the values are the source's own UIDs, this implementation's constants and
        # the pseudonym, written as they are either way.
        sop_class = self._read(source, 0x00020002)  # MediaStorageSOPClassUID
        if not sop_class:
            sop_class = self._read(ds, 0x00080016, "")  # SOPClassUID
        instance = self._read(source, 0x00020003)  # MediaStorageSOPInstanceUID
        instance = str(instance or self._read(ds, 0x00080018, ""))  # SOPInstanceUID
        new_instance = instance if self._settings.retain_uids else self._uid(instance, call)
        syntax = UID(str(source.TransferSyntaxUID))
        meta = FileMetaDataset({
            BaseTag(tag): DataElement(tag, vr, value, validation_mode=config.IGNORE)
            for tag, vr, value in (
                (0x00020001, "OB", b"\x00\x01"),  # FileMetaInformationVersion
                (0x00020002, "UI", sop_class),
                (0x00020003, "UI", new_instance),  # MediaStorageSOPInstanceUID
                (0x00020010, "UI", syntax),
                (0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
                (0x00020013, "SH", IMPLEMENTATION_VERSION_NAME),
            )
        })
        for tag in source.keys():  # noqa: SIM118
            if tag == _MEDIA_INSTANCE:
                remapped = new_instance != instance.strip("\x00 ")
                call.note(UID_REMAPPED if remapped else KEPT, tag)
            elif tag & 0xFFFF:
                call.note(_META_EVIDENCE.get(int(tag), REMOVED), tag)
        return meta


def _applied(name: str, code: Any) -> AppliedOption:
    return AppliedOption(name=name, code=code.value, meaning=code.meaning)


def _code_item(code: Any) -> Dataset:
    """One code item, built as the {tag: element} mapping Dataset takes; the values
    are the engine's own constants (CID 7050), so pydicom's value validation, a
    third of building them, is skipped."""
    return Dataset({
        Tag(tag): DataElement(tag, vr, value, validation_mode=config.IGNORE)
        for tag, vr, value in (
            (0x00080100, "SH", code.value),  # CodeValue
            (0x00080102, "SH", code.scheme_designator),  # CodingSchemeDesignator
            (0x00080104, "LO", code.meaning),  # CodeMeaning
        )
    })


def encode(ds: Dataset) -> bytes:
    """The Part 10 bytes of a de-identified dataset, in its own transfer syntax.
    Deterministic: the same dataset always encodes to the same bytes."""
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# -- the annotator route ---------------------------------------------------------------

_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: a sequence item starts
_PSEUDONYM_ID = re.compile(f"{PSEUDONYM_PREFIX}-([A-Z2-7]{{16}})")
# Identity attributes the engine never keeps with a value, under any option: in an
# object whose patient is already pseudonymous, a value in one of them came back in.
_IDENTITY_KEYWORDS = (
    "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "PatientTelecomInformation", "MedicalRecordLocator",
    "ResponsiblePerson", "MilitaryRank", "BranchOfService", "PatientReligiousPreference",
)


def remap_known_uids(
    ds: Dataset, key: ProjectKey, is_known_pseudonym: Callable[[str], bool]
) -> tuple[Dataset, int]:
    """A copy of an annotator's object with every original clinical UID it still
    references replaced by the pseudonym de-identification gave that UID.

    A UID is replaced when its keyed pseudonym ``key.uid(value)`` satisfies
    ``is_known_pseudonym`` (the node asks its re-identification map), that is, when
    it is an original UID of an object already de-identified: an annotation tool
    that loaded the study from the clinical PACS references it by those. Every UID
    at any depth is looked at: UI elements, UIDs in UN elements (implicit VR, or
    sent as UN), and file meta MediaStorageSOPInstanceUID. Everything else, UIDs
    already pseudonymous or unknown, well-known UIDs and all other elements, is left
    exactly as it was (elements not replaced keep their bytes). Returns the copy and
    the number of UID values replaced; deterministic, and ``ds`` is not modified."""
    out = copy.deepcopy(ds)
    memo: dict[str, str | None] = {}

    def pseudonym_of(uid: str) -> str | None:
        if uid not in memo:
            memo[uid] = None
            if uid and uid not in UID_dictionary and not uid.startswith("1.2.840.10008."):
                candidate = key.uid(uid)
                if is_known_pseudonym(candidate):
                    memo[uid] = candidate
        return memo[uid]

    count = _remap_dataset(out, pseudonym_of)
    meta = getattr(out, "file_meta", None)
    if meta is not None and _MEDIA_INSTANCE in meta:
        count += _remap_element(meta, _MEDIA_INSTANCE, "UI", pseudonym_of)
    return out, count


def _remap_dataset(ds: Dataset, pseudonym_of: Callable[[str], str | None]) -> int:
    count = 0
    # keys(), not iteration: decode only what may hold UIDs.
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = raw.VR
        if vr is None or vr == "UN":
            value = raw.value
            if isinstance(value, bytes) and value[:4] == _ITEM_TAG:
                vr = ds[tag].VR  # a sequence whose VR was not sent: pydicom infers SQ
            elif vr is None:
                vr = _dictionary_vr(tag)
        if vr == "SQ":
            count += sum(_remap_dataset(item, pseudonym_of) for item in ds[tag].value)
        elif vr in ("UI", "UN"):
            count += _remap_element(ds, tag, vr, pseudonym_of)
    return count


def _remap_element(ds: Dataset, tag: int, vr: str,
                   pseudonym_of: Callable[[str], str | None]) -> int:
    value = ds.get_item(tag).value
    if isinstance(value, bytes):
        if vr == "UN":
            uids = parse_un_uids(value)
            if uids is None:
                return 0
        else:
            try:
                uids = [u.strip("\x00 ") for u in value.decode("ascii").split("\\")]
            except UnicodeDecodeError:
                return 0
    else:
        uids = [str(v).strip("\x00 ") for v in _values(value)]
    replaced = [pseudonym_of(u) for u in uids]
    count = sum(r is not None for r in replaced)
    if count:
        new = [r or u for r, u in zip(replaced, uids, strict=True)]
        ds[tag] = (
            DataElement(tag, "UN", encode_un_uids(new)) if vr == "UN"
            else DataElement(tag, "UI", _one_or_many(new), validation_mode=config.IGNORE)
        )
    return count


def looks_identified(ds: Dataset) -> str | None:
    """Why an object from an annotator route still seems to carry a patient's
    identity, in plain words without any value, or None if it does not.

    Objects from annotators should name the patient only by the pseudonyms
    de-identification made (``LAMINA-...`` and the matching ``LAMINA^...``), whether
    or not the tool copied PatientIdentityRemoved. An object is flagged when it
    names a patient otherwise, and, when its patient is pseudonymous, when it has
    an identity attribute that de-identification always removes. Beware that
    de-identifying an object whose PatientID is already a pseudonym gives it a
    pseudonym of the pseudonym: the node may prefer quarantine for the latter
    case."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    name = str(ds.get("PatientName", "") or "").strip().rstrip("^= ")
    removed = str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"
    match = _PSEUDONYM_ID.fullmatch(patient_id)
    if match is None and (patient_id or name):
        if not removed:
            return ("PatientIdentityRemoved is not YES and the object names a patient "
                    "(PatientID or PatientName) other than by a Lamina pseudonym")
        return ("PatientIdentityRemoved is YES but PatientID is not a Lamina pseudonym: "
                "the object was not de-identified by this project")
    if match is not None and name and name != f"{PSEUDONYM_PREFIX}^{match[1]}":
        return "PatientName is not the pseudonym that goes with the object's PatientID"
    for keyword in _IDENTITY_KEYWORDS:
        if keyword in ds and _has_value(ds[keyword]):
            return f"{keyword} has a value, which de-identification never keeps"
    return None


def _has_value(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return len(elem.value) > 0
    return any(str(v).strip("\x00 ^=") for v in _values(elem.value))
