"""The CLI: keys init, anonymize, reidentify — and exit status 2 for bad input."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import config, dcmread

from node.anonymize.keys import ENV_VAR, KEY_PREFIX, create_key_file
from tests.harness import lamina
from tests.phi_corpus import PATIENTS, STUDIES, write_ct_series


@pytest.fixture(autouse=True)
def _restore_pydicom_validation(monkeypatch):
    """The commands switch pydicom's validation off for their process; not for others."""
    monkeypatch.setattr(config.settings, "reading_validation_mode",
                        config.settings.reading_validation_mode)


@pytest.fixture(autouse=True)
def _away_from_the_repository_config(tmp_path, monkeypatch):
    """``anonymize`` reads ./config/node.toml like every command: run where there is none."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAMINA_CONFIG", raising=False)


@pytest.fixture
def key(tmp_path) -> Path:
    return create_key_file(tmp_path / "keys" / "project.key")


@pytest.fixture
def series(tmp_path) -> list[Path]:
    return write_ct_series(STUDIES[0], tmp_path / "in" / PATIENTS[0].family)


def test_keys_init_creates_a_private_key_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k" / "project.key"
    first = lamina("keys", "init", "--out", str(path))
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "key_file" in first.output and ENV_VAR in first.output
    content = path.read_bytes()
    second = lamina("keys", "init", "--out", str(path))
    assert second.exit_code == 2
    assert "refusing to overwrite" in second.output
    assert path.read_bytes() == content


def test_keys_init_defaults_to_the_user_config_folder(tmp_path):
    result = lamina("keys", "init", env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cfg" / "lamina" / "project.key").is_file()


def test_anonymize_a_folder_writes_content_addressed_files(key, series, tmp_path):
    out = tmp_path / "out"
    result = lamina("anonymize", str(series[0].parent), "--out", str(out),
                    "--key-file", str(key))
    assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert len(files) == len(series)
    for file in files:
        assert file.name == hashlib.sha256(file.read_bytes()).hexdigest() + ".dcm"
        assert dcmread(file).PatientIdentityRemoved == "YES"
    again = lamina("anonymize", str(series[0].parent), "--out", str(out),
                   "--key-file", str(key))
    assert again.exit_code == 0
    assert sorted(out.iterdir()) == files  # same input, same bytes, same names


def test_parallel_jobs_give_the_same_files_and_map(key, series, tmp_path):
    outputs, maps = {}, {}
    for jobs in ("1", "2"):
        index = tmp_path / f"map{jobs}.sqlite"
        result = lamina("anonymize", str(series[0].parent), "--out",
                        str(tmp_path / f"out{jobs}"), "--key-file", str(key),
                        "--index", str(index), "--jobs", jobs)
        assert result.exit_code == 0, result.output
        outputs[jobs] = {p.name: p.read_bytes() for p in (tmp_path / f"out{jobs}").iterdir()}
        with sqlite3.connect(index) as conn:
            maps[jobs] = sorted(conn.execute("SELECT lookup FROM reid_uid").fetchall())
    assert outputs["1"] == outputs["2"] and len(outputs["1"]) == len(series)
    assert maps["1"] == maps["2"] and len(maps["1"]) == len(series) + 3


def test_anonymize_without_a_key_says_how_to_make_one(series, tmp_path):
    result = lamina("anonymize", str(series[0]), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "lamina keys init" in result.output
    assert not (tmp_path / "o").exists()


def test_anonymize_takes_the_key_from_the_environment(key, series, tmp_path):
    result = lamina("anonymize", str(series[0]), "--out", str(tmp_path / "o"),
                    env={ENV_VAR: key.read_text()})
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "o").iterdir())) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["anonymize", "/nonexistent/input", "--out", "{out}"], "does not exist"),
        (["anonymize", "{inp}", "--out", "{inp}/inner"], "must not be inside an input folder"),
        (["anonymize", "{inp}", "--out", "{out}", "--config", "{config}"],
         "deidentify.retain_uids"),
    ],
)
def test_bad_input_exits_with_status_2(key, series, tmp_path, args, message):
    config = tmp_path / "node.toml"
    config.write_text("[deidentify]\nretain_uids = 'yes'\n")
    index = tmp_path / "index.sqlite"
    index.touch()
    places = {"inp": series[0].parent, "out": tmp_path / "out", "config": config,
              "index": index, "file": series[0]}
    argv = [a.format(**places) for a in args]
    result = lamina(*argv, "--key-file", str(key))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_files_refused_for_burned_in_text_make_the_run_fail(key, tmp_path):
    from tests.phi_corpus import build_corpus

    corpus = build_corpus(tmp_path / "corpus")
    result = lamina("anonymize", str(corpus.screen_capture), str(corpus.seg),
                    "--out", str(tmp_path / "o"), "--key-file", str(key))
    assert result.exit_code == 1
    assert "Skipped 1: quarantine: Secondary Capture" in result.output
    assert len(list((tmp_path / "o").iterdir())) == 1



# A fixed project key, and the names (SHA-256 of the bytes) of the files ``lamina
# anonymize`` wrote with it for the series below before the header-only runner: the
# output must stay byte-identical for the same input and key. The bytes name the
# Lamina version (DeidentificationMethod, ImplementationVersionName) and follow
# pydicom's encoder, so a version bump changes them; nothing else may.
GOLDEN_KEY = KEY_PREFIX + base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")
GOLDEN_NAMES = [
    "0b60503e54a5c7c41eea21317b4d097fd63f5951f27c6b6315318fd1cda2240a.dcm",
    "30172499698d7b6ba26d171814c77293cb3db48ec9f02c3cd9d1810d554f734e.dcm",
    "3c310e2275b7fd4450c4151f825a04ab874b03c4dd44858490617fcf2d12c6b8.dcm",
    "4bff11ba86c2838853e48b2eaa34bea29dd652ded55e2bf5baae8243d107b72a.dcm",
    "5036b776fdcbdff5442e4336cceda6354bc4b88c34886bb28d9b403d652d2904.dcm",
    "51a202b13a8d23072a3f719e350115b18e863fb93fffc29abb5b36b9e354922f.dcm",
    "58adad58028f85090eefa30499dac94310da4908f686803ce029b9f03b278903.dcm",
    "591f7c73b604565e311b1738c07fce6ac00a5f420f054eafa183bce419ab5a0f.dcm",
    "75a13e77a410ea77d09fed79d3be662c0dce6e90ac8b42fa8c0b9fe9087c99f6.dcm",
    "7738faf378d0224f261090fdad87c58aab0bfa0f0d66c1ead03023a95043c5ff.dcm",
    "78538cdf55b3f06531bad15fffd2cd7133532eca2a58eacd3a77baedb7a30c24.dcm",
    "a9cff71c39777621df569acafac1faa44037752fbe26a2f783beeb5f1c03ec45.dcm",
    "b49ae77952873f15652da0719e1f73f3fae18cd67c93f0ed5cf462cc1b1dd45e.dcm",
    "bff772fa07f74e848758b1165a90d598465a21d3b6011d32c61a5592afd59b85.dcm",
    "d2c7f6903292e1f5beaf73970895d03e8a8cafa98ec7bb03af9da2e430d25f89.dcm",
    "f5fbfe1169cf934f4f3161650f79905e5009400aa50b204135f0831ea08ffe24.dcm",
]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_output_is_byte_identical_to_the_golden_files(tmp_path, jobs):
    """Four studies of 64x64 slices: explicit and implicit VR little endian, deflated
    and RLE, so both the header-only path and the whole-file path are held to it."""
    for study in STUDIES:
        write_ct_series(study, tmp_path / "in" / f"s{study.patient.key}{study.index}",
                        rows=64, columns=64)
    out = tmp_path / "out"
    result = lamina("anonymize", str(tmp_path / "in"), "--out", str(out), "--jobs", jobs,
                    env={ENV_VAR: GOLDEN_KEY})
    assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert [f.name for f in files] == GOLDEN_NAMES
    for file in files:
        assert file.name == hashlib.sha256(file.read_bytes()).hexdigest() + ".dcm"


def test_the_program_gives_the_golden_files(tmp_path):
    """``python -m node anonymize`` as a program (its own start-up: lazy command import,
    pydicom without its optional downloads, forked workers) writes the golden bytes."""
    for study in STUDIES:
        write_ct_series(study, tmp_path / "in" / f"s{study.patient.key}{study.index}",
                        rows=64, columns=64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA")}
    run = subprocess.run([sys.executable, "-m", "node", "anonymize", str(tmp_path / "in"),
                          "--out", str(tmp_path / "out"), "--jobs", "2"],
                         env={**env, ENV_VAR: GOLDEN_KEY}, cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == GOLDEN_NAMES


def test_a_file_that_is_not_dicom_is_named_as_skipped_and_the_rest_written(key, series,
                                                                          tmp_path):
    (series[0].parent / "notes.txt").write_text("Patient: Jane Doe\n")
    out = tmp_path / "out"
    result = lamina("anonymize", str(series[0].parent), "--out", str(out),
                    "--key-file", str(key))
    assert result.exit_code == 1
    assert "Skipped 1: not a readable DICOM file" in result.output
    assert "Jane" not in result.output
    assert len(list(out.iterdir())) == len(series)
