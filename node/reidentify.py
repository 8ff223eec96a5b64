"""Re-identification as a node service: every use is audited before the answer is given.

DICOM audit event 110110 (Patient Record): who asked, for which pseudonymous
target. The answer itself (original identifiers) never enters the trail.
"""

from __future__ import annotations

import getpass
import hashlib
import os
from pathlib import Path

from pydicom.dataset import Dataset

from node.anonymize.commands import reidentify_target
from node.audit.trail import Actor
from node.context import NodeContext


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
