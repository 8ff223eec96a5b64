"""``lamina reidentify``: pseudonym back to the original, audited, only with the right key."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread

from node.anonymize.keys import create_key_file
from node.cli import main
from tests.nodeproc import write_config
from tests.phi_corpus import PATIENTS, STUDIES, write_ct_series


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """A node config whose index holds the map of an anonymized series."""
    key = create_key_file(tmp_path / "project.key")
    config = tmp_path / "node.toml"
    write_config(config, {
        "storage": {"data": str(tmp_path / "data")},
        "audit": {"signing_key": str(tmp_path / "audit.pem")},
        "deidentify": {"key_file": str(key)},
    })
    series = write_ct_series(STUDIES[0], tmp_path / "series")
    (tmp_path / "data").mkdir()
    done = CliRunner().invoke(main, [
        "anonymize", *map(str, series), "--out", str(tmp_path / "out"), "--key-file", str(key),
        "--index", str(tmp_path / "data" / "index.sqlite3")])
    assert done.exit_code == 0, done.output
    return config, tmp_path / "out", series


def test_a_uid_and_a_whole_object_map_back_and_are_audited(setup, tmp_path):
    config, out, _ = setup
    anonymous = next(out.iterdir())
    ds = dcmread(anonymous)
    runner = CliRunner()
    uid = runner.invoke(main, ["reidentify", ds.StudyInstanceUID, "--config", str(config)])
    assert uid.exit_code == 0, uid.output
    assert uid.output.strip() == STUDIES[0].study_uid
    restored_path = tmp_path / "restored.dcm"
    whole = runner.invoke(main, ["reidentify", str(anonymous), "--config", str(config),
                                 "--out", str(restored_path)])
    assert whole.exit_code == 0, whole.output
    restored = dcmread(restored_path)
    assert restored.PatientName == PATIENTS[0].name
    assert restored.PatientID == PATIENTS[0].patient_id
    assert restored.StudyDate == STUDIES[0].study_date
    verify = runner.invoke(main, ["audit", "verify", "--config", str(config)])
    assert verify.exit_code == 0 and "2 entries" in verify.output


@pytest.mark.parametrize(("target", "message"), [
    ("not-a-uid", "neither a file nor a UID"),
    ("2.25.12345", "not a pseudonymous UID"),
])
def test_bad_targets_exit_2(setup, target, message):
    config, _, _ = setup
    result = CliRunner().invoke(main, ["reidentify", target, "--config", str(config)])
    assert result.exit_code == 2 and message in result.output


def test_a_file_needs_out(setup):
    config, out, _ = setup
    result = CliRunner().invoke(main, ["reidentify", str(next(out.iterdir())),
                                       "--config", str(config)])
    assert result.exit_code == 2 and "--out" in result.output


def test_another_key_cannot_read_the_map(setup, tmp_path):
    config, _, _ = setup
    other = create_key_file(tmp_path / "other.key")
    config.write_text(config.read_text().replace(str(tmp_path / "project.key"), str(other)))
    result = CliRunner().invoke(main, ["reidentify", "2.25.12345", "--config", str(config)])
    assert result.exit_code == 2 and "is this the project's key?" in result.output
