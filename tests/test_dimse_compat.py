"""The private pynetdicom names node.dimse relies on are still there, and of the same kind.

When pynetdicom is upgraded and one of them moves, this fails naming it (and why
the node needs it: read node/dimse/compat.py), instead of the node failing later
on the wire.
"""

from __future__ import annotations

import importlib
import re

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts

from node.config import NodeSettings
from node.dimse import compat
from node.dimse.ae import build_scp
from node.sop_classes import STORAGE_SOP_CLASSES


def _association() -> Association:
    """An acceptor association that is never started (no socket, no thread)."""
    return Association(AE(), "acceptor")


def _owner(where: str) -> object:
    if where.startswith("Association()"):
        obj: object = _association()
        for part in where.removeprefix("Association()").split(".")[1:]:
            obj = getattr(obj, part)
        return obj
    if "." not in where:  # a module: _config, acse
        return importlib.import_module(f"pynetdicom.{where}")
    module, _, name = where.rpartition(".")
    if name.endswith("()"):  # an instance of the class, for attributes set in __init__
        return getattr(importlib.import_module(f"pynetdicom.{module}"), name[:-2])()
    return getattr(importlib.import_module(f"pynetdicom.{module}"), name)


@pytest.mark.parametrize(("where", "name", "kind", "why"), compat.CONTRACT,
                         ids=[f"{w}.{n}" for w, n, _, _ in compat.CONTRACT])
def test_private_name_is_still_there(where, name, kind, why):
    owner = _owner(where)
    assert hasattr(owner, name), (
        f"pynetdicom changed: {where}.{name} is gone (node.dimse.compat needs it: {why})")
    value = getattr(owner, name)
    if kind == "method":
        assert callable(value), f"pynetdicom changed: {where}.{name} is no longer a method ({why})"
    else:
        assert not callable(value) or isinstance(value, type), (
            f"pynetdicom changed: {where}.{name} is no longer an attribute ({why})")


def test_every_private_name_compat_touches_is_in_the_contract():
    """An underscore attribute or a _config flag written in compat.py but not checked above
    would break silently on upgrade."""
    source = open(compat.__file__, encoding="utf-8").read()
    code = source.split("# --- process configuration", 1)[1]  # after the contract itself
    used = set(re.findall(r"(?:\.|def )(_[a-z]\w*)", code)) | set(
        re.findall(r"_config\.([A-Z_]+)", code))
    checked = {name for _, name, _, _ in compat.CONTRACT}
    assert used, "nothing found: the pattern is wrong"
    assert not used - checked, f"add to compat.CONTRACT: {sorted(used - checked)}"


def test_hooks_route_pynetdicoms_private_calls_to_our_methods():
    calls: list[str] = []

    class Assoc(compat.AssociationHooks):
        def serve_request(self, msg, context_id):
            calls.append(f"serve {context_id}")

    class Loops(compat.QueryRetrieveHooks):
        def c_find(self, req, context):
            calls.append("find")

        def c_move(self, req, context):
            calls.append("move")

        def c_get(self, req, context):
            calls.append("get")

    assoc = _association()
    compat.adopt(assoc, Assoc)
    assoc._serve_request(None, 3)
    loops = Loops(assoc)
    for private in ("_c_find_scp", "_move_scp", "_get_scp"):
        getattr(loops, private)(None, None)
    assert calls == ["serve 3", "find", "move", "get"]
    assert compat.accepted_context(assoc, 1) is None and not compat.is_releasing(assoc)
    with compat.serving(assoc):
        assert assoc._is_paused
    assert compat.send_queue_empty(assoc) and compat.socket_of(assoc) is None


def test_the_storage_sop_class_list_equals_pynetdicoms():
    ours = set(STORAGE_SOP_CLASSES)
    theirs = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    assert not theirs - ours, f"pynetdicom knows storage classes node/sop_classes.py lacks: " \
                              f"{sorted(theirs - ours)}"
    assert not ours - theirs, f"node/sop_classes.py lists classes pynetdicom no longer knows: " \
                              f"{sorted(ours - theirs)}"


def test_pdu_helpers_round_trip():
    from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ, A_RELEASE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import PresentationContext

    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title, request.called_ae_title = "A", "B"
    request.maximum_length_received = 16384
    request.implementation_class_uid = "1.2.3"
    cx = PresentationContext()
    cx.context_id, cx.abstract_syntax, cx.transfer_syntax = 1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"]
    request.presentation_context_definition_list.append(cx)
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(compat.encode_associate_rq(request))
    assert decoded.calling_ae_title == "A"
    release = A_RELEASE_RQ()
    release.decode(compat.encode_release_rq())
    abort = A_ABORT_RQ()
    abort.decode(compat.encode_abort_rq(0x00))
    assert abort.source == 0x00


def test_a_remembered_negotiation_is_pynetdicoms_own_result():
    from pynetdicom.presentation import build_context, negotiate_as_acceptor
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

    supported = compat.SharedContexts(build_scp(NodeSettings()).supported_contexts)
    requested = [build_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
                 build_context(MRImageStorage, ["1.2.840.10008.1.2.4.50"]),
                 build_context("1.2.3.4.5", ["1.2.840.10008.1.2"]),  # not supported
                 build_context(Verification, ["9.9.9"])]  # no common transfer syntax
    for n, cx in enumerate(requested):
        cx.context_id = 2 * n + 1
    roles = {CTImageStorage: (False, True)}

    def outcome(results, role_items):
        return ([(cx.context_id, cx.abstract_syntax, cx.transfer_syntax, cx.result,
                  cx.as_scu, cx.as_scp) for cx in results],
                [(r.sop_class_uid, r.scu_role, r.scp_role) for r in role_items])

    expected = outcome(*negotiate_as_acceptor(requested, list(supported), roles))
    first = compat.negotiate_shared(requested, supported, roles)
    second = compat.negotiate_shared(requested, supported, roles)
    assert outcome(*first) == outcome(*second) == expected
    assert len(supported.negotiated) == 1
    assert not set(map(id, first[0])) & set(map(id, second[0]))  # each gets its own contexts
    assert [r for *_, r, _, _ in expected[0]] == [0, 0, 3, 4]
    requested[1].transfer_syntax = ["1.2.840.10008.1.2.1"]  # another request: negotiated anew
    assert outcome(*compat.negotiate_shared(requested, supported, roles))[0][1][2] == \
        ["1.2.840.10008.1.2.1"]
    assert len(supported.negotiated) == 2
