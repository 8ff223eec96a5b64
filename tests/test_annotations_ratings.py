"""`lamina labels import FILE --rater ID` (node.annotations.ratings) and the kappas the QA
report computes from the imported labels: exact fractions, flagged below the threshold."""

from __future__ import annotations

from pathlib import Path

import pytest

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
