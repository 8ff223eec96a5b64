"""The project key: creating and loading it, and the keyed pseudonyms derived from it.

Every replacement Lamina makes for an identifier is an HMAC-SHA256 under a subkey of
one secret project key, so the same original always maps to the same replacement —
across associations, restarts and machines sharing the key — while anyone without
the key cannot reverse it by hashing candidate UIDs or patient IDs (the weakness of
unkeyed MD5/SHA UID hashing). The key lives outside the data folder: a copy of the
store alone must not be enough to re-identify it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.anonymize.temporal import TemporalOffset

ENV_VAR = "LAMINA_PROJECT_KEY"
KEY_PREFIX = "lamina-project-key-v1:"
KEY_BYTES = 32
PSEUDONYM_PREFIX = "LAMINA"
# Dates move backwards by 1..MAX_DATE_SHIFT_DAYS days: backwards, because dates in the
# future are rejected by some PACS; up to ten years, so the shift hides the real date.
MAX_DATE_SHIFT_DAYS = 3652


class ProjectKeyError(Exception):
    """The project key is missing, malformed, misplaced or unprotected."""


@dataclass(frozen=True)
class PatientPseudonym:
    """The replacement identity of one (IssuerOfPatientID, PatientID)."""

    patient_id: str
    patient_name: str


class ProjectKey:
    """A loaded project key. Holds only derived subkeys, one per purpose, so a
    pseudonym of one kind can never collide with or reveal another kind."""

    __slots__ = ("_date", "_lookup", "_map", "_patient", "_uid", "key_id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise ProjectKeyError(f"project key must be {KEY_BYTES} bytes")
        self._uid = _subkey(secret, b"uid")
        self._patient = _subkey(secret, b"patient")
        self._date = _subkey(secret, b"date-offset")
        self._lookup = _subkey(secret, b"reid-lookup")
        self._map = _subkey(secret, b"reid-map-aes-256-gcm")
        self.key_id = _subkey(secret, b"key-id")[:8].hex()

    def __repr__(self) -> str:
        return f"ProjectKey(key_id={self.key_id!r})"

    def uid(self, original: str) -> str:
        """A ``2.25.`` UID for an original UID. The 128 HMAC bits are stamped as a
        version-8 (custom) UUID so the result is a well-formed UUID-derived UID."""
        digest = bytearray(hmac.digest(self._uid, original.encode("ascii", "replace"), "sha256"))
        digest[6] = (digest[6] & 0x0F) | 0x80
        digest[8] = (digest[8] & 0x3F) | 0x80
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"

    def patient(self, issuer: str, patient_id: str) -> PatientPseudonym:
        """Pseudonymous PatientID and PatientName for an issuer-qualified patient ID;
        the issuer is part of the input because IDs are only unique per issuer."""
        digest = hmac.digest(self._patient, _patient_message(issuer, patient_id), "sha256")
        code = base64.b32encode(digest[:10]).decode("ascii")
        return PatientPseudonym(
            patient_id=f"{PSEUDONYM_PREFIX}-{code}", patient_name=f"{PSEUDONYM_PREFIX}^{code}"
        )

    def date_offset_days(self, issuer: str, patient_id: str) -> int:
        """The days of the per-patient shift, negative, the same for all of a
        patient's studies so that intervals between them survive."""
        return self.temporal_offset(issuer, patient_id).days

    def temporal_offset(self, issuer: str, patient_id: str) -> TemporalOffset:
        """The per-patient shift of every date and time: whole days (as
        :meth:`date_offset_days`) plus keyed minutes, so times move too and a
        study's time of day reveals nothing."""
        digest = hmac.digest(self._date, _patient_message(issuer, patient_id), "sha256")
        return TemporalOffset(
            days=-(1 + int.from_bytes(digest[:8], "big") % MAX_DATE_SHIFT_DAYS),
            minutes=int.from_bytes(digest[8:16], "big") % 1440,
        )

    def lookup(self, kind: str, value: str) -> bytes:
        """Index value for the re-identification map: finding a row needs the key."""
        return hmac.digest(self._lookup, f"{kind}\x00{value}".encode(), "sha256")

    @property
    def map_key(self) -> bytes:
        """AES-256-GCM key for re-identification map payloads."""
        return self._map


def _subkey(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"lamina/" + purpose
    ).derive(secret)


def _patient_message(issuer: str, patient_id: str) -> bytes:
    return f"{issuer.strip()}\x00{patient_id.strip()}".encode("utf-8", "replace")


def encode_key(secret: bytes) -> str:
    """The text form used in key files and in the environment variable."""
    return KEY_PREFIX + base64.urlsafe_b64encode(secret).decode("ascii").rstrip("=")


def decode_key(text: str) -> ProjectKey:
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise ProjectKeyError(f"project key is malformed: it must start with {KEY_PREFIX!r}")
    body = text[len(KEY_PREFIX):]
    try:
        secret = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise ProjectKeyError("project key is malformed: not base64url") from None
    if len(secret) != KEY_BYTES:
        raise ProjectKeyError(f"project key is malformed: it must hold {KEY_BYTES} bytes")
    return ProjectKey(secret)


def default_key_path() -> Path:
    """Where ``lamina keys init`` puts a key by default: the user's config folder,
    which is never the node's data folder."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "lamina" / "project.key"


def create_key_file(path: Path) -> Path:
    """Write a new random key to ``path`` with mode 0600. Refuses to overwrite: a
    replaced key silently breaks every pseudonym and the re-identification map."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ProjectKeyError(f"{path} already exists; refusing to overwrite a key") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (encode_key(os.urandom(KEY_BYTES)) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load_project_key(
    key_file: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    data_dir: Path | None = None,
) -> ProjectKey:
    """Load the key from ``key_file`` if given, else from ``$LAMINA_PROJECT_KEY``.

    Refuses a key file inside ``data_dir`` or readable by group/others, and says how
    to make a key when there is none, because de-identifying without one is not an
    option the node offers."""
    environ = os.environ if environ is None else environ
    if key_file is not None:
        path = Path(key_file).expanduser()
        if data_dir is not None and path.resolve().is_relative_to(Path(data_dir).resolve()):
            raise ProjectKeyError(
                f"key file {path} is inside the data folder; keep it outside the store"
            )
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ProjectKeyError(
                f"key file {path} not found; create one with `lamina keys init --out {path}`"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ProjectKeyError(
                f"key file {path} is accessible to group or others; run `chmod 600 {path}`"
            )
        return decode_key(path.read_text(encoding="ascii", errors="replace"))
    if environ.get(ENV_VAR):
        return decode_key(environ[ENV_VAR])
    raise ProjectKeyError(
        "no project key: create one with `lamina keys init --out PATH`, then set "
        f"deidentify.key_file = PATH in the node config or export {ENV_VAR}=\"$(cat PATH)\""
    )
