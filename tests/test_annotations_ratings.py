"""`lamina labels import FILE --rater ID` (node.annotations.ratings) and the kappas the QA
report computes from the imported labels: exact fractions, flagged below the threshold."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from node.context import NodeContext
from tests import annotation_fixtures as fx
from tests.harness import lamina, write_config

CATEGORIES = """
[agreement.categories]
nodule_present = ["yes", "no"]
malignancy = ["benign", "malignant"]
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node with the phantom study stored; its config path and the study's served UIDs."""
    folder = tmp_path_factory.mktemp("ratings") / "node"
    folder.mkdir()
    (folder / "protocol.toml").write_text(fx.TEST_PROTOCOL + CATEGORIES)
    config = write_config(folder, peers=fx.PEERS,
                          annotations={"protocol": str(folder / "protocol.toml")})
    ctx = NodeContext.open(config.settings(), with_key=True)
    try:
        for k in range(fx.PHANTOM.slices_count):
            ctx.ingest.ingest_bytes(fx.encode(fx.PHANTOM.slice(k)), fx.PACS)
        served = fx.served(ctx)
    finally:
        ctx.close()
    return config, served


def csv(path: Path, rows: list[tuple[str, str, str, str]],
        header: str = "study_instance_uid,sop_instance_uid,question,answer") -> Path:
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return path


def recorded(config) -> tuple[int, int]:
    """(labels recorded, refusals audited)."""
    ctx = NodeContext.open(config.settings(), must_exist=True, migrate=False)
    try:
        with ctx.index.reader() as r:
            return len(r.agreement.ratings()), len(r.audit.of_action("labels.refused"))
    finally:
        ctx.close()


def answers(served, question: str, values: list[str]) -> list[tuple[str, str, str, str]]:
    """One per-slice answer for slices 1..n."""
    return [(served.study_uid, served.sop_uid(k), question, v) for k, v in enumerate(values)]


def test_bad_files_are_refused_whole_and_name_the_row(node, tmp_path):
    config, served = node
    good = answers(served, "nodule_present", ["yes", "no"])
    cases = {
        "unknown study": [*good, ("2.25.1", "", "nodule_present", "yes")],
        "unknown instance": [*good, (served.study_uid, "2.25.2", "nodule_present", "no")],
        "unknown category 'maybe'": [*good, (served.study_uid, "", "nodule_present", "maybe")],
        "unknown question 'size'": [*good, (served.study_uid, "", "size", "big")],
        "already labelled the item": [*good, good[0]],
    }
    before = recorded(config)
    for message, rows in cases.items():
        result = lamina("labels", "import", str(csv(tmp_path / "bad.csv", rows)),
                        "--rater", "r1", config=config)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "row 4" in result.stderr
        assert result.stderr.strip().endswith("nothing was recorded")
        assert len(result.stderr.strip().splitlines()) == 1
    missing = csv(tmp_path / "nohead.csv", [("x", "y", "z")], header="study,sop,question")
    result = lamina("labels", "import", str(missing), "--rater", "r1", config=config)
    assert result.exit_code == 2 and "missing column 'study_instance_uid'" in result.stderr
    assert recorded(config) == (before[0], before[1] + len(cases) + 1)


def test_imported_labels_give_exact_kappas_and_a_flag(node, tmp_path):
    config, served = node
    # Two raters on four slices: (y,y) (n,y) (n,n) (n,n) → Cohen's kappa 1/2 (< 0.6: flagged).
    for rater, values in (("r1", ["yes", "no", "no", "no"]), ("r2", ["yes", "yes", "no", "no"])):
        done = lamina("labels", "import",
                      str(csv(tmp_path / f"{rater}.csv", answers(served, "nodule_present",
                                                                 values))),
                      "--rater", rater, config=config)
        assert done.exit_code == 0, done.output
        assert done.stdout.strip() == "4 label(s) recorded for nodule_present"
    # Three raters on four slices: per-slice agreement 1, 1, 1, 1/3 → Fleiss' kappa 5/8.
    three = {"r1": ["benign", "benign", "malignant", "benign"],
             "r2": ["benign", "benign", "malignant", "benign"],
             "r3": ["benign", "benign", "malignant", "malignant"]}
    for rater, values in three.items():
        done = lamina("labels", "import", str(csv(tmp_path / f"m-{rater}.csv", answers(
            served, "malignancy", values))), "--rater", rater, config=config)
        assert done.exit_code == 0, done.output
    twice = lamina("labels", "import", str(tmp_path / "r1.csv"), "--rater", "r1", config=config)
    assert twice.exit_code == 2 and "already labelled" in twice.stderr

    report = lamina("qa", "report", "--html", str(tmp_path / "qa.html"), config=config)
    assert report.exit_code == 0, report.output
    lines = report.stdout.splitlines()
    assert "GUIDELINE REVIEW NEEDED for 1 class(es):" in lines
    assert any(line.startswith("  nodule_present: kappa 0.50 < 0.60") for line in lines)
    row = next(line for line in lines if line.strip().startswith("nodule_present "))
    assert "0.500 (1/2)" in row and row.endswith("!")
    row = next(line for line in lines if line.strip().startswith("malignancy "))
    assert "0.625 (5/8)" in row and not row.endswith("!")
    page = (tmp_path / "qa.html").read_text()
    assert "Guideline review needed" in page and "1/2" in page and page.count("<svg") == 4
    assert page.count("<polyline") == 2  # running kappa of both questions, import by import


def measurement_report(served, evaluations: list[tuple[int | None, str, str]]) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 SR on the served study: one measurement group per (slice or None for the
    whole study, question, answer), each with one qualitative evaluation."""
    groups = []
    for n, (k, question, answer) in enumerate(evaluations):
        sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(served.slice(k))] \
            if k is not None else None
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"g{n}"),
            source_images=sources,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                hd.sr.CodedConcept(question, "99LAMINA", question),
                hd.sr.CodedConcept(answer, "99LAMINA", answer))]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name="Reader^SR"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=groups)
    evidence = [served.slice(k) for k in {0, *(k for k, _, _ in evaluations if k is not None)}]
    return hd.sr.Comprehensive3DSR(evidence=evidence, content=report, series_number=9,
                                   series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(),
                                   instance_number=1, manufacturer="Lamina tests")


def test_qualitative_evaluations_of_a_tid1500_report_are_labels(node, tmp_path):
    config, served = node
    path = tmp_path / "report.dcm"
    measurement_report(served, [(5, "nodule_present", "yes"), (None, "malignancy", "benign")]
                       ).save_as(path, enforce_file_format=True)
    before = recorded(config)[0]
    done = lamina("labels", "import", str(path), "--rater", "sr-reader", config=config)
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == "2 label(s) recorded for malignancy, nodule_present"
    assert recorded(config)[0] == before + 2
    again = lamina("labels", "import", str(path), "--rater", "sr-reader", config=config)
    assert again.exit_code == 2 and "measurement group 1: this rater already labelled" \
        in again.stderr
    bad = tmp_path / "bad.dcm"
    measurement_report(served, [(6, "nodule_present", "perhaps")]).save_as(
        bad, enforce_file_format=True)
    refused = lamina("labels", "import", str(bad), "--rater", "sr-reader", config=config)
    assert refused.exit_code == 2 and "unknown category 'perhaps'" in refused.stderr
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(path.read_bytes()[:400])
    refused = lamina("labels", "import", str(broken), "--rater", "sr-reader", config=config)
    assert refused.exit_code == 2 and "not a TID 1500 measurement report" in refused.stderr
    assert recorded(config)[0] == before + 2
