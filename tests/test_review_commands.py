"""``lamina users`` and ``lamina review`` against a node's data folder: the passphrase from a
file descriptor or a prompt (never the command line), one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from tests import harness
from tests.review_fixtures import PASSPHRASE, Annotations, open_review_node, passphrase_fd, tamper


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("review-cli")
    ctx = open_review_node(folder)
    yield ctx, folder / "node.toml"
    ctx.close()


@pytest.fixture(scope="module")
def made(node) -> Annotations:
    return Annotations(node[0])


def lamina(config, *args: str, input: str | None = None):
    return harness.lamina(*args, config=config, input=input)


@pytest.fixture(scope="module")
def rad1(node) -> str:
    _, config = node
    fd = passphrase_fd(PASSPHRASE)
    added = lamina(config, "users", "add", "rad1", "--name", "Ann Radiologist",
                   "--passphrase-fd", str(fd))
    assert added.exit_code == 0, added.output
    return "rad1"


def test_users_add_list_disable(node, rad1):
    _, config = node
    prompted = lamina(config, "users", "add", "rad2", "--name", "Bo Radiologist", "--rater",
                      "Bo^R", input=f"{PASSPHRASE}\n{PASSPHRASE}\n")
    assert prompted.exit_code == 0, prompted.output
    assert PASSPHRASE not in prompted.output  # asked without echo
    assert lamina(config, "users", "disable", "rad2").exit_code == 0
    listed = [json.loads(line) for line in
              lamina(config, "users", "list", "--json").output.splitlines()]
    assert [(u["user_id"], u["status"], u["raters"]) for u in listed] == [
        ("rad1", "active", []), ("rad2", "disabled", ["Bo^R"])]
    again = lamina(config, "users", "add", "rad2", "--name", "X Y", "--passphrase-fd",
                   str(passphrase_fd(PASSPHRASE)))
    assert again.exit_code == 2 and "never reused" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_users_disable_and_unlock_refuse_with_one_line(node, rad1):
    _, config = node
    unknown = lamina(config, "users", "disable", "nobody")
    assert unknown.exit_code == 2 and "unknown user 'nobody'" in unknown.stderr
    not_locked = lamina(config, "users", "unlock", rad1)
    assert not_locked.exit_code == 2 and f"user '{rad1}' is not locked" in not_locked.stderr
    assert len(not_locked.stderr.strip().splitlines()) == 1

def test_the_passphrase_is_never_taken_on_the_command_line(node, rad1):
    _, config = node
    result = lamina(config, "review", "approve", "1", "--as", rad1, "--meaning", "ok",
                    "--passphrase", PASSPHRASE)
    assert result.exit_code == 2 and "No such option" in result.output


def test_approve_over_the_cli_then_verify(node, made, rad1):
    _, config = node
    annotation_id = made.checked()
    result = lamina(config, "review", "approve", str(annotation_id), "--as", rad1, "--meaning",
                    "reviewed and approved", "--passphrase-fd", str(passphrase_fd(PASSPHRASE)))
    assert result.exit_code == 0, result.output
    assert f"annotation {annotation_id} approved by rad1" in result.stdout
    assert made.state(annotation_id) == "approved"
    rejected = made.checked()
    result = lamina(config, "review", "reject", str(rejected), "--as", rad1, "--meaning",
                    "reviewed and rejected", "--reason", "wrong class",
                    input=f"{PASSPHRASE}\n")
    assert result.exit_code == 0, result.output
    assert made.state(rejected) == "rejected"
    verified = lamina(config, "review", "verify")
    assert verified.exit_code == 0, verified.output
    assert "signatures valid: 2" in verified.stdout
    one = lamina(config, "review", "verify", str(annotation_id))
    assert one.exit_code == 0 and "signatures valid: 1" in one.stdout
    shown = lamina(config, "review", "show", str(rejected))
    assert shown.exit_code == 0, shown.output
    assert "rejected by Ann Radiologist (rad1) at " in shown.stdout
    assert '"reviewed and rejected", reason: wrong class [valid]' in shown.stdout
    assert lamina(config, "audit", "verify").exit_code == 0


def test_verify_exits_1_naming_a_tampered_signature(node, made, rad1):
    ctx, config = node
    annotation_id = made.checked()
    assert lamina(config, "review", "approve", str(annotation_id), "--as", rad1, "--meaning",
                  "ok", "--passphrase-fd", str(passphrase_fd(PASSPHRASE))).exit_code == 0
    tamper(ctx, f"UPDATE review_signature SET meaning = 'changed' WHERE annotation_fk ="
                f" {annotation_id}")
    result = lamina(config, "review", "verify", str(annotation_id))
    assert result.exit_code == 1
    assert f"annotation {annotation_id} signature" in result.stderr
    assert "meaning differs from the signed manifest" in result.stderr


@pytest.mark.parametrize("case", ["unknown annotation", "unknown user", "wrong passphrase",
                                  "approved twice", "pending"])
def test_bad_input_is_one_line_exit_2_and_audited(node, made, rad1, case):
    ctx, config = node
    annotation_id, user, passphrase = made.checked(), rad1, PASSPHRASE
    if case == "unknown annotation":
        annotation_id = 9999
    elif case == "unknown user":
        user = "nobody"
    elif case == "wrong passphrase":
        passphrase = "not the passphrase"
    elif case == "approved twice":
        assert lamina(config, "review", "approve", str(annotation_id), "--as", user,
                      "--meaning", "ok", "--passphrase-fd",
                      str(passphrase_fd(PASSPHRASE))).exit_code == 0
    elif case == "pending":
        with ctx.index.transaction() as tx:
            assert tx.annotations.set_state(annotation_id, "checked", "pending", "t")
    with ctx.index.reader() as r:
        before = r.audit.last()[0], len(r.signatures.list())
    result = lamina(config, "review", "approve", str(annotation_id), "--as", user, "--meaning",
                    "ok", "--passphrase-fd", str(passphrase_fd(passphrase)))
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    with ctx.index.reader() as r:
        assert (r.audit.last()[0], len(r.signatures.list())) == (before[0] + 1, before[1])
    assert lamina(config, "review", "verify", "9999").exit_code == 2
