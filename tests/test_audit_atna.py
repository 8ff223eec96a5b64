"""``lamina audit export --format atna``: every event of the trail as a DICOM audit message,
each valid against the audit message schema (tests/data, PS3.15 A.5.1), the right DICOM event
codes, no patient data, ``--since`` honoured."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.audit.atna import event_of
from node.review.service import ReviewRefused
from tests import annotation_fixtures as fx
from tests import harness
from tests.review_fixtures import ADMIN, PASSPHRASE, REVIEWER, Annotations, open_review_node

lxml_etree = pytest.importorskip("lxml.etree", reason="lxml (the test extra) validates the schema")

SCHEMA = Path(__file__).parent / "data" / "dicom-audit-message.rng"


@pytest.fixture(scope="module")
def schema():
    return lxml_etree.RelaxNG(lxml_etree.parse(str(SCHEMA)))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """Stores, an annotation, a user, an approval, a self-approval refused, a lockout."""
    folder = tmp_path_factory.mktemp("atna")
    ctx = open_review_node(folder, review={"lock_after": 2})
    made = Annotations(ctx)
    ctx.review.users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN)
    ctx.review.users.add("reader1", "One Reader", PASSPHRASE, ADMIN)
    ctx.review.decide(made.checked(), "approve", "rad1", PASSPHRASE, "approved", REVIEWER)
    with pytest.raises(ReviewRefused):
        ctx.review.decide(made.checked(), "approve", "reader1", PASSPHRASE, "ok", REVIEWER)
    for _ in range(2):
        with pytest.raises(ReviewRefused):
            ctx.review.decide(made.checked(), "approve", "rad1", "not the one", "ok", REVIEWER)
    ctx.close()
    return folder / "node.toml"


def exported(config, *args: str) -> list[bytes]:
    result = harness.lamina("audit", "export", "--format", "atna", *args, config=config)
    assert result.exit_code == 0, result.output
    return [line.encode() for line in result.stdout.splitlines()]


def test_every_event_is_one_schema_valid_message(node, schema):
    messages = exported(node)
    assert len(messages) > 40  # the phantom's stores alone are 30-odd events
    for message in messages:
        document = lxml_etree.fromstring(message)
        assert schema.validate(document), (message[:200], schema.error_log.last_error)


def codes(messages: list[bytes]) -> list[tuple[str, str, str]]:
    out = []
    for message in messages:
        event = lxml_etree.fromstring(message).find("EventIdentification")
        trail = [o for o in lxml_etree.fromstring(message).iter("ParticipantObjectIdentification")
                 if o.find("ParticipantObjectIDTypeCode").get("csd-code") == "audit-entry"]
        out.append((trail[0].findtext("ParticipantObjectName"),
                    event.find("EventID").get("csd-code"), event.get("EventOutcomeIndicator")))
    return out


def test_events_carry_the_dicom_codes(node):
    found = codes(exported(node))
    actions = {a: (c, o) for a, c, o in found}
    assert actions["instance.stored"] == ("110104", "0")
    assert actions["annotation.approved"] == ("110103", "0")
    assert actions["review.refused"] == ("110103", "4")
    assert actions["user.authentication"] == ("110114", "4")
    assert actions["security.alert"] == ("110113", "8")
    assert actions["user.added"][0] == "110113"


def test_no_patient_data_leaves_in_the_messages(node):
    text = b"\n".join(exported(node)).decode()
    phantom = fx.PHANTOM.slice(0)
    for value in (str(phantom.PatientName), str(phantom.PatientID), str(phantom.StudyInstanceUID)):
        assert value and value not in text


def test_an_export_is_itself_audited_as_audit_log_used(node):
    before = len(exported(node))
    after = exported(node)
    assert len(after) == before + 1  # the first export, recorded after it ran
    assert codes(after)[-1] == ("audit.exported", "110101", "0")


def test_since_filters_and_bad_since_is_refused(node):
    everything = exported(node)
    assert exported(node, "--since", "2999-01-01") == []
    # everything, and the two exports since
    assert len(exported(node, "--since", "2000-01-01T00:00:00+02:00")) == len(everything) + 2
    bad = harness.lamina("audit", "export", "--format", "atna", "--since", "yesterday",
                         config=node)
    assert bad.exit_code == 2 and "not an ISO 8601" in bad.stderr


_PARTS = (b'<ActiveParticipant UserID="x" UserIsRequestor="true"/>'
          b'<AuditSourceIdentification AuditSourceID="y"/>')
_EVENT = (b'<EventIdentification EventDateTime="2026-01-01T00:00:00Z" EventOutcomeIndicator="0">'
          b'<EventID csd-code="110100" codeSystemName="DCM" originalText="Application Activity"/>'
          b'</EventIdentification>')


@pytest.mark.parametrize("document", [
    b"<AuditMessage>" + _PARTS + b"</AuditMessage>",  # no event
    b"<AuditMessage>" + _EVENT + _PARTS +  # an object with neither name nor query
    b'<ParticipantObjectIdentification ParticipantObjectID="1"><ParticipantObjectIDTypeCode'
    b' csd-code="110180" codeSystemName="DCM" originalText="Study Instance UID"/>'
    b"</ParticipantObjectIdentification></AuditMessage>",
], ids=["no-event", "object-without-name"])
def test_the_schema_refuses_what_the_standard_refuses(schema, document):
    assert schema.validate(lxml_etree.fromstring(b"<AuditMessage>" + _EVENT + _PARTS +
                                                 b"</AuditMessage>"))
    assert not schema.validate(lxml_etree.fromstring(document))


@pytest.mark.parametrize("action,code", [("node.started", "110100"), ("query.find", "110112"),
                                         ("retrieve.move", "110104"),
                                         ("patient-record.reidentify", "110110"),
                                         ("annotation.exported", "110106"),
                                         ("annotation.imported", "110107")])
def test_actions_map_to_events(action, code):
    assert event_of(action)[0].code == code
