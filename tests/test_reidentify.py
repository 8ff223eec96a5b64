"""``lamina reidentify``: pseudonym back to the original, audited, only with the right key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from node.anonymize.keys import create_key_file
from tests.harness import lamina, write_config
from tests.phi_corpus import PATIENTS, STUDIES, write_ct_series


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """A node config whose index holds the map of an anonymized series."""
    key = create_key_file(tmp_path / "project.key")
    config = write_config(tmp_path, key=False, deidentify={"key_file": str(key)}).path
    series = write_ct_series(STUDIES[0], tmp_path / "series")
    (tmp_path / "data").mkdir()
    done = lamina(
        "anonymize", *map(str, series), "--out", str(tmp_path / "out"), "--key-file", str(key),
        "--index", str(tmp_path / "data" / "index.sqlite3"))
    assert done.exit_code == 0, done.output
    return config, tmp_path / "out", series


def test_a_uid_and_a_whole_object_map_back_and_are_audited(setup, tmp_path):
    config, out, series = setup
    anonymous = next(out.iterdir())
    ds = dcmread(anonymous)
    uid = lamina("reidentify", ds.StudyInstanceUID, config=config)
    assert uid.exit_code == 0, uid.output
    assert uid.output.strip() == STUDIES[0].study_uid
    restored_path = tmp_path / "restored.dcm"
    whole = lamina("reidentify", str(anonymous), "--out", str(restored_path), config=config)
    assert whole.exit_code == 0, whole.output
    restored = dcmread(restored_path)
    assert restored.PatientName == PATIENTS[0].name
    assert restored.PatientID == PATIENTS[0].patient_id
    assert restored.StudyDate == STUDIES[0].study_date
    # Times were shifted with the dates (issue 16) and come back with them.
    assert ds.StudyTime != "101112"
    original = next(dcmread(p) for p in series if dcmread(p).SOPInstanceUID
                    == restored.SOPInstanceUID)
    temporal = [e.keyword for e in original
                if e.VR in ("DA", "TM", "DT") and e.keyword in ds and ds[e.keyword].value]
    assert {"StudyTime", "ContentTime", "AcquisitionDateTime", "ContentDate"} <= set(temporal)
    assert {k: restored[k].value for k in temporal} == {k: original[k].value for k in temporal}
    verify = lamina("audit", "verify", config=config)
    assert verify.exit_code == 0 and "2 entries" in verify.output


@pytest.mark.parametrize(("target", "message"), [
    ("not-a-uid", "neither a file nor a UID"),
    ("2.25.12345", "not a pseudonymous UID"),
])
def test_bad_targets_exit_2(setup, target, message):
    config, _, _ = setup
    result = lamina("reidentify", target, config=config)
    assert result.exit_code == 2 and message in result.output


def test_a_file_needs_out(setup):
    config, out, _ = setup
    result = lamina("reidentify", str(next(out.iterdir())), config=config)
    assert result.exit_code == 2 and "--out" in result.output


def test_another_key_cannot_read_the_map(setup, tmp_path):
    config, _, _ = setup
    other = create_key_file(tmp_path / "other.key")
    config.write_text(config.read_text().replace(str(tmp_path / "project.key"), str(other)))
    result = lamina("reidentify", "2.25.12345", config=config)
    assert result.exit_code == 2 and "is this the project's key?" in result.output
