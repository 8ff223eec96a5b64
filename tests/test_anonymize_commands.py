"""The CLI: keys init, anonymize, reidentify — and exit status 2 for bad input."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
from pathlib import Path

import pytest
from pydicom import config, dcmread

from node.anonymize.keys import ENV_VAR, create_key_file
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

