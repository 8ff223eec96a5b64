"""Re-identification as a node service: every use is audited before the answer is given.

DICOM audit event 110110 (Patient Record): who asked, for which pseudonymous
target. The answer itself (original identifiers) never enters the trail.
"""

from __future__ import annotations

import getpass
import hashlib
import os
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.anonymize.keys import ProjectKey
from node.anonymize.reidmap import ReidentificationMap, reidentify_dataset, reidentify_uid
from node.audit.trail import Actor
from node.context import NodeContext
from node.storage.interface import Reader


def reidentify(ctx: NodeContext, target: str) -> str | Dataset:
    """Map a pseudonymous UID (or a stored-style object file) back to the originals."""
    if ctx.key is None:
        raise RuntimeError("open the context with_key=True to re-identify")
    path = Path(target)
    obj = ({"file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
           if path.is_file() else {"uid": target})
    actor = Actor(user=f"{getpass.getuser()}@pid:{os.getpid()}")
    try:
        with ctx.index.reader() as reader:
            result = reidentify_target(target, key=ctx.key, reader=reader)
    except Exception:
        ctx.audit.record("patient-record.reidentify", actor, obj, outcome="minor-failure")
        raise
    ctx.audit.record("patient-record.reidentify", actor, obj)
    return result


def reidentify_target(target: str, *, key: ProjectKey, reader: Reader) -> str | Dataset:
    """Map a pseudonymous UID back to the original UID (returns ``str``), or a Part
    10 file back onto the original identifiers (returns the ``Dataset``). Unaudited:
    :func:`reidentify` is the audited way in. Raises ``ReidentificationError`` for an
    unknown UID or a map written under another key."""
    rmap = ReidentificationMap(key)
    path = Path(target)
    if path.is_file():
        return reidentify_dataset(reader, rmap, dcmread(path))
    return reidentify_uid(reader, rmap, target)
