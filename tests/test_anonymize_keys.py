"""The project key: file handling, environment, and the pseudonyms it derives."""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from node.anonymize.keys import (
    ENV_VAR,
    MAX_DATE_SHIFT_DAYS,
    ProjectKey,
    ProjectKeyError,
    create_key_file,
    decode_key,
    encode_key,
    load_project_key,
)


def test_create_key_file_is_private_and_never_overwritten(tmp_path):
    path = create_key_file(tmp_path / "keys" / "project.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(ProjectKeyError, match="refusing to overwrite"):
        create_key_file(path)
    assert path.read_bytes() == before
    key = load_project_key(path, environ={})
    assert key.key_id == load_project_key(path, environ={}).key_id
    assert create_key_file(tmp_path / "other.key").read_bytes() != before


def test_key_from_environment_and_file_agree(tmp_path):
    path = create_key_file(tmp_path / "project.key")
    from_file = load_project_key(path, environ={})
    from_env = load_project_key(environ={ENV_VAR: path.read_text()})
    assert from_file.uid("1.2.3") == from_env.uid("1.2.3")
    assert from_file.key_id == from_env.key_id


def test_missing_key_says_how_to_make_one():
    with pytest.raises(ProjectKeyError, match="lamina keys init"):
        load_project_key(environ={})


@pytest.mark.parametrize("text", ["", "lamina-project-key-v1:", "not-a-key",
                                  "lamina-project-key-v1:@@@@", encode_key(b"x" * 16)])
def test_malformed_keys_are_refused(text):
    with pytest.raises(ProjectKeyError, match="malformed"):
        decode_key(text)


def test_key_file_inside_data_folder_is_refused(tmp_path):
    data = tmp_path / "data"
    path = create_key_file(data / "secrets" / "project.key")
    with pytest.raises(ProjectKeyError, match="inside the data folder"):
        load_project_key(path, environ={}, data_dir=data)


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = create_key_file(tmp_path / "project.key")
    os.chmod(path, 0o644)
    with pytest.raises(ProjectKeyError, match="chmod 600"):
        load_project_key(path, environ={})


def test_missing_key_file_is_reported(tmp_path):
    with pytest.raises(ProjectKeyError, match="not found"):
        load_project_key(tmp_path / "absent.key", environ={})


def test_uid_pseudonyms_are_keyed_deterministic_uuid_derived_uids():
    key, other = ProjectKey(b"a" * 32), ProjectKey(b"b" * 32)
    new = key.uid("1.2.840.113619.2.55.3.1")
    assert new == key.uid("1.2.840.113619.2.55.3.1")
    assert new != key.uid("1.2.840.113619.2.55.3.2")
    assert new != other.uid("1.2.840.113619.2.55.3.1")
    assert new.startswith("2.25.") and len(new) <= 64
    assert new[5:].isdigit() and not new[5:].startswith("0")
    assert uuid.UUID(int=int(new[5:])).version == 8


def test_patient_pseudonyms_depend_on_issuer_and_are_never_empty():
    key = ProjectKey(b"a" * 32)
    north = key.patient("NORTH", "123")
    assert north == key.patient(" NORTH", "123 ")
    assert north != key.patient("SOUTH", "123")
    assert north.patient_id.startswith("LAMINA-") and len(north.patient_id) <= 64
    assert north.patient_name == "LAMINA^" + north.patient_id.split("-", 1)[1]
    assert key.patient("", "").patient_id


def test_date_offsets_are_per_patient_backwards_and_bounded():
    key = ProjectKey(b"a" * 32)
    offsets = {key.date_offset_days("N", str(i)) for i in range(200)}
    assert all(-MAX_DATE_SHIFT_DAYS <= o <= -1 for o in offsets)
    assert len(offsets) > 150
    assert key.date_offset_days("N", "1") == key.date_offset_days("N", "1")


def test_key_repr_does_not_reveal_the_secret():
    secret = b"s3cr3t-material-0123456789abcdef"
    text = repr(ProjectKey(secret))
    assert "s3cr3t" not in text and encode_key(secret) not in text
