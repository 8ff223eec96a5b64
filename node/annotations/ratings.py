"""Categorical labels per study or per slice: ``lamina labels import FILE --rater ID``.

One file holds one rater's answers: a CSV file, or a DICOM SR measurement
report (TID 1500) whose qualitative evaluations are the answers, read with
highdicom (the evaluation's concept name is the question, its coded value the
answer; a measurement group's source image makes it a per-slice label, a group
without one labels the SR's study). CSV columns (a header row, any order):

* ``study_instance_uid`` — a stored (pseudonymous) study;
* ``sop_instance_uid`` — optional: a stored instance of that study (a per-slice label);
  empty for a per-study label;
* ``question`` — what is labelled (a finding, a protocol class);
* ``answer`` — the rater's category.

The whole file is checked before anything is written, and written in one
transaction with its audit event: a bad row (unknown study or instance, a
category the protocol does not list for the question, an item the rater
already labelled, in this file or before) refuses the file, naming the row.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import highdicom as hd

from node.audit.trail import Actor, AuditTrail, utc_now
from node.checks.protocol import Protocol
from node.storage.interface import Index
from node.storage.records import RatingRow

COLUMNS = ("study_instance_uid", "sop_instance_uid", "question", "answer")
MAX_ROWS = 1_000_000


class RatingsRefused(ValueError):
    """The file cannot be imported; the message names the row and the problem."""


@dataclass(frozen=True)
class Imported:
    rows: int
    questions: tuple[str, ...]
    sha256: str


def import_ratings(index: Index, audit: AuditTrail, protocol: Protocol, data: bytes,
                   rater: str, actor: Actor) -> Imported:
    """Check every row, then record them all with one audit event; raises
    :class:`RatingsRefused` (audited, nothing recorded)."""
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        rows = _parse(index, protocol, data, rater.strip(), sha256)
        with index.transaction() as tx:
            for row in rows:  # re-checked inside the transaction: a concurrent import
                if tx.agreement.rated(row.question, row.item, row.rater):
                    raise RatingsRefused(f"{row.item}: already labelled by this rater for "
                                         f"{row.question!r}")
            tx.agreement.insert_ratings(rows, utc_now())
            entry = audit.append(tx, "labels.imported", actor, {
                "rows": len(rows), "sha256": sha256,
                "questions": sorted({r.question for r in rows})})
    except RatingsRefused as exc:
        audit.record("labels.refused", actor, {"sha256": sha256, "reason": str(exc)},
                     outcome="minor-failure")
        raise
    audit.committed(entry)
    return Imported(len(rows), tuple(sorted({r.question for r in rows})), sha256)


#: One answer before it is checked: (where, study, instance or '', question, answer).
Raw = tuple[str, str, str, str, str]


def _parse(index: Index, protocol: Protocol, data: bytes, rater: str,
           sha256: str) -> list[RatingRow]:
    if not rater:
        raise RatingsRefused("the rater id is empty")
    if len(data) > 132 and data[128:132] == b"DICM":
        source, answers = _from_sr(data)
    else:
        source, answers = f"csv:{sha256}", _from_csv(data)
    rows: list[RatingRow] = []
    seen: set[tuple[str, str]] = set()
    with index.reader() as r:
        for where, study, instance, question, answer in answers:
            if not study or not question or not answer:
                raise RatingsRefused(f"{where}: study_instance_uid, question and answer "
                                     f"are required")
            if not r.agreement.study_known(study):
                raise RatingsRefused(f"{where}: unknown study")
            if instance and r.agreement.study_of_instance(instance) != study:
                raise RatingsRefused(f"{where}: unknown instance (not stored in that study)")
            allowed = protocol.categories.get(question)
            if protocol.categories and allowed is None:
                raise RatingsRefused(f"{where}: unknown question {question!r} "
                                     f"(the protocol lists {', '.join(sorted(protocol.categories))})")
            if allowed is not None and answer not in allowed:
                raise RatingsRefused(f"{where}: unknown category {answer!r} for {question!r}")
            item = f"instance:{instance}" if instance else f"study:{study}"
            if (question, item) in seen or r.agreement.rated(question, item, rater):
                raise RatingsRefused(f"{where}: this rater already labelled the item for "
                                     f"{question!r}")
            seen.add((question, item))
            rows.append(RatingRow(question, item, study, rater, answer, source))
    if not rows:
        raise RatingsRefused("the file has no rows")
    return rows


def _from_csv(data: bytes) -> Iterator[Raw]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RatingsRefused("the file is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("study_instance_uid", "question", "answer")
               if c not in (reader.fieldnames or [])]
    if missing:
        raise RatingsRefused(f"header: missing column {missing[0]!r} "
                             f"(expected {', '.join(COLUMNS)})")
    for number, raw in enumerate(reader, start=2):
        if number > MAX_ROWS:
            raise RatingsRefused(f"more than {MAX_ROWS} rows")
        yield (f"row {number}", *((raw.get(c) or "").strip() for c in COLUMNS))


def _from_sr(data: bytes) -> tuple[str, list[Raw]]:
    """(source, answers) of a TID 1500 measurement report's qualitative evaluations."""
    try:
        sr = hd.sr.srread(io.BytesIO(data))
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
        groups = [*report.get_image_measurement_groups(),
                  *report.get_planar_roi_measurement_groups(),
                  *report.get_volumetric_roi_measurement_groups()]
        answers: list[Raw] = []
        study = str(sr.StudyInstanceUID)
        for n, group in enumerate(groups, start=1):
            images = [str(i.referenced_sop_instance_uid)
                      for i in getattr(group, "source_images", [])] or [""]
            for evaluation in group.get_qualitative_evaluations():
                for instance in images:
                    answers.append((f"measurement group {n}", study, instance,
                                    str(evaluation.name.meaning).strip(),
                                    str(evaluation.value.meaning).strip()))
    except Exception as exc:  # untrusted bytes: anything highdicom cannot read is refused
        raise RatingsRefused(f"not a TID 1500 measurement report highdicom can read "
                             f"({type(exc).__name__})") from None
    return f"sr:{sr.SOPInstanceUID}", answers
