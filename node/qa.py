"""The QA report's figures: agreement per class, counts, findings per rater, the double-read
and adjudication queues (``lamina qa report``; HTML in :mod:`node.qa_html`).

Kappa per class (a "class" here is a categorical question):

* SEG structures: the question is the segment's property category, the
  answer its property type code; each structure of a comparison is one item
  with rater A's and rater B's answers (``(absent)`` for the rater who did not
  draw it). Comparisons of different rater pairs are pooled into one Cohen's
  kappa (first reader, second reader), the usual way a double-read design is
  summarised.
* Imported labels (``lamina labels import``): per question, Cohen's kappa
  when two raters answered, Fleiss' kappa when three or more did
  (:func:`node.checks.kappa.kappa`).

Kappas are exact fractions; the report prints them as decimals next to the
fraction. The running kappa (after each comparison, in order) is what the
HTML page plots over time. A class is flagged when its kappa is below the
protocol's ``kappa_min`` (0.6: the labelling guideline needs revision) or its
mean Dice below its ``dice_min``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

from node.checks.kappa import KappaError, cohen_kappa, kappa
from node.checks.protocol import Protocol
from node.storage.interface import Index
from node.storage.records import Row


@dataclass
class ClassAgreement:
    """One class's (or question's) agreement across the project."""

    name: str
    source: str  # seg | labels
    items: int = 0
    kappa: Fraction | None = None
    kappa_method: str = ""
    dice: list[float] = field(default_factory=list)
    dice_min: float | None = None
    #: (time, running kappa) after each comparison, oldest first.
    kappa_over_time: list[tuple[str, float]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def mean_dice(self) -> float | None:
        return sum(self.dice) / len(self.dice) if self.dice else None


@dataclass
class QAReport:
    protocol: str
    kappa_min: float
    classes: list[ClassAgreement]
    comparisons: int
    disagreeing: int
    readings_by_rater: dict[str, dict[str, int]]
    findings_by_rater: dict[str, dict[str, int]]
    double_reads: list[Row]
    adjudications: list[Row]
    states: dict[str, int]

    @property
    def flagged(self) -> list[ClassAgreement]:
        return [c for c in self.classes if c.flags]

    @property
    def findings_by_check(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for checks in self.findings_by_rater.values():
            for name, count in checks.items():
                totals[name] += count
        return dict(sorted(totals.items()))


def build_report(index: Index, protocol: Protocol) -> QAReport:
    """Read everything the report shows in one snapshot and compute its figures."""
    with index.reader() as r:
        comparisons = r.agreement.comparisons()
        structures = r.agreement.structures()
        ratings = r.agreement.ratings()
        by_rater = r.agreement.readings_by_rater()
        findings = r.agreement.finding_counts()
        double_reads = r.agreement.double_reads()
        adjudications = r.agreement.adjudications()
    classes = _dice_classes(structures, protocol) + _seg_kappas(structures)
    classes += _label_kappas(ratings)
    for item in classes:
        if item.kappa is not None and item.kappa < Fraction(protocol.kappa_min).limit_denominator():
            item.flags.append(f"kappa {float(item.kappa):.2f} < {protocol.kappa_min:.2f}: "
                              f"revise the labelling guideline")
        if item.mean_dice is not None and item.dice_min is not None \
                and item.mean_dice < item.dice_min:
            item.flags.append(f"mean Dice {item.mean_dice:.2f} < {item.dice_min:.2f}")
    readings: dict[str, dict[str, int]] = defaultdict(dict)
    states: dict[str, int] = defaultdict(int)
    for row in by_rater:
        readings[row["rater"] or "(unknown)"][row["state"]] = row["annotations"]
        states[row["state"]] += row["annotations"]
    per_rater: dict[str, dict[str, int]] = defaultdict(dict)
    for row in findings:
        per_rater[row["rater"] or "(unknown)"][row["check_name"]] = row["findings"]
    return QAReport(
        protocol=protocol.name, kappa_min=protocol.kappa_min, classes=classes,
        comparisons=len(comparisons),
        disagreeing=sum(1 for c in comparisons if c["verdict"] == "disagree"),
        readings_by_rater=dict(readings), findings_by_rater=dict(per_rater),
        double_reads=double_reads, adjudications=adjudications, states=dict(states))


def _dice_classes(structures: list[Row], protocol: Protocol) -> list[ClassAgreement]:
    by_class: dict[str, ClassAgreement] = {}
    for s in structures:
        item = by_class.setdefault(s["class_key"], ClassAgreement(
            s["class_key"], "seg", dice_min=protocol.dice_min_for(s["class_key"])))
        item.items += 1
        if s["dice"] is not None and not s["classes_differ"]:
            item.dice.append(float(s["dice"]))
    return [by_class[k] for k in sorted(by_class)]


def _seg_kappas(structures: list[Row]) -> list[ClassAgreement]:
    """Per SEG category: Cohen's kappa of the type answers, running over comparisons."""
    by_question: dict[str, list[Row]] = defaultdict(list)
    for s in structures:
        by_question[s["question"]].append(s)
    out = []
    for question in sorted(by_question):
        rows = by_question[question]
        item = ClassAgreement(question, "seg-type", items=len(rows), kappa_method="cohen")
        pairs: list[tuple[str, str]] = []
        for n, s in enumerate(rows):
            pairs.append((s["answer_a"], s["answer_b"]))
            last = n + 1 == len(rows) or rows[n + 1]["agreement_fk"] != s["agreement_fk"]
            if last:
                value = cohen_kappa(pairs)
                if value is not None:
                    item.kappa_over_time.append((s["computed_at"], float(value)))
        item.kappa = cohen_kappa(pairs)
        out.append(item)
    return out


def _label_kappas(ratings: list[Row]) -> list[ClassAgreement]:
    """Per imported question: Cohen (two raters) or Fleiss (three or more)."""
    by_question: dict[str, list[Row]] = defaultdict(list)
    for row in sorted(ratings, key=lambda r: (r["recorded_at"], r["id"])):
        by_question[row["question"]].append(row)
    out = []
    for question in sorted(by_question):
        result = ClassAgreement(question, "labels")
        items: dict[str, dict[str, str]] = defaultdict(dict)
        rows = by_question[question]
        for n, row in enumerate(rows):
            items[row["item"]][row["rater"]] = row["answer"]
            if n + 1 == len(rows) or rows[n + 1]["recorded_at"] != row["recorded_at"]:
                try:  # the running kappa after each import
                    _, value, _ = kappa(items)
                except KappaError:
                    continue
                if value is not None:
                    result.kappa_over_time.append((row["recorded_at"], float(value)))
        try:
            result.kappa_method, result.kappa, result.items = kappa(items)
        except KappaError as exc:
            result.kappa_method = f"n/a ({exc})"
            result.items = len(items)
        out.append(result)
    return out


def render_text(report: QAReport) -> str:
    """The report for a terminal: flagged classes first, then the tables."""
    lines = [f"QA report — protocol {report.protocol}; kappa threshold {report.kappa_min:.2f}"]
    if report.flagged:
        lines.append(f"GUIDELINE REVIEW NEEDED for {len(report.flagged)} class(es):")
        lines += [f"  {c.name}: {'; '.join(c.flags)}" for c in report.flagged]
    else:
        lines.append("No class below its thresholds.")
    lines += ["", "Agreement per class:",
              f"  {'class':<40} {'source':<9} {'items':>5} {'kappa':>16} {'mean Dice':>9}"]
    for c in report.classes:
        k = "n/a" if c.kappa is None else f"{float(c.kappa):.3f} ({c.kappa})"
        d = "" if c.mean_dice is None else f"{c.mean_dice:.3f}"
        lines.append(f"  {c.name[:40]:<40} {c.source:<9} {c.items:>5} {k:>16} {d:>9}"
                     + ("  !" if c.flags else ""))
    lines += ["", f"Comparisons: {report.comparisons} ({report.disagreeing} disagree)",
              "Annotations by state: " + (", ".join(f"{k} {v}" for k, v in
                                                    sorted(report.states.items())) or "none")]
    lines += ["", "Readings and findings per rater:"]
    for rater in sorted(set(report.readings_by_rater) | set(report.findings_by_rater)):
        states = report.readings_by_rater.get(rater, {})
        found = report.findings_by_rater.get(rater, {})
        lines.append(f"  {rater}: {sum(states.values())} annotation(s); findings "
                     + (", ".join(f"{k} {v}" for k, v in found.items()) or "none"))
    waiting = [d for d in report.double_reads if d["state"] == "waiting"]
    lines += ["", f"Double reads: {len(report.double_reads)} chosen, {len(waiting)} waiting "
                  f"for a second reader"]
    lines += [f"  waiting: {d['study_uid']}" for d in waiting]
    open_ = [a for a in report.adjudications if a["state"] == "open"]
    lines += [f"Adjudications: {len(report.adjudications)} ({len(open_)} open)"]
    lines += [f"  #{a['id']} {a['state']}: annotations {a['annotation_a']} / {a['annotation_b']}"
              + (f" → {a['decision']} {a['chosen_annotation']}" if a["decision"] else "")
              for a in report.adjudications]
    lines.append(f"Approvals: {report.states.get('approved', 0)}")
    return "\n".join(lines) + "\n"
