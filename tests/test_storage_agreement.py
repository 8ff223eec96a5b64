"""The agreement repository (node.storage.sqlite.agreement) and migration 0010."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from node.storage.records import AgreementStructureRow, RatingRow
from node.storage.sqlite.index import SqliteIndex, migrations


def old_index(path: Path) -> None:
    """An index as migration 0009 left it, with two annotations (one naming its person)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for number, _name, sql in migrations():
        if number >= 10:
            break
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version={number}")
    for n, person in ((1, "Reader^One"), (2, "")):
        conn.execute("INSERT INTO annotation (id, kind, key, source_series_uid, annotator_ae,"
                     " annotator_address, annotator_person, state, created_at, updated_at)"
                     " VALUES (?, 'seg', ?, '1.2', ?, 'a', ?, 'checked', 't', 't')",
                     (n, f"seg|{n}", f"WS{n}", person))
    conn.close()


def structure(dice: float | None) -> AgreementStructureRow:
    return AgreementStructureRow("nodule", "segment 1", "segment 1" if dice else None,
                                 "SCT:27925004", "SCT:27925004" if dice else "(absent)",
                                 "SCT:49755003 Abnormal", False, dice, dice, 1.0, 1.0, 10.0, 11.0)


def test_migration_0010_names_existing_raters_and_the_repository_round_trips(tmp_path):
    path = tmp_path / "index.sqlite3"
    old_index(path)
    index = SqliteIndex(path)
    try:
        assert index.migrate() == migrations()[-1][0]
        with index.transaction() as tx:
            raters = {row["id"]: row["rater"] for row in tx.annotations.list()}
            assert raters == {1: "Reader^One", 2: "WS2"}  # the person, else the AE title
            a = {"id": 1, "current_check_fk": 11, "rater": "Reader^One"}
            b = {"id": 2, "current_check_fk": 12, "rater": "WS2"}
            first = tx.agreement.record("1.2", "1", (a, b), "", ["why"],
                                        [structure(0.5), structure(None)], "t1")
            again = tx.agreement.record("1.2", "1", (a, b), "", [], [structure(0.9)], "t2")
            assert again == first  # recomputed in place: one comparison per pair
            assert [s["dice"] for s in tx.agreement.structures(first)] == [0.9]
            assert tx.agreement.get(first)["verdict"] == "agree"
            adjudication = tx.agreement.open_adjudication(first, "t")
            assert tx.agreement.open_adjudication(first, "t") == adjudication
            assert tx.agreement.decide(adjudication, "pick", 1, "someone", "t")
            assert not tx.agreement.decide(adjudication, "pick", 2, "other", "t")
            assert tx.agreement.choose("1", "t") and not tx.agreement.choose("1", "t")
            assert tx.agreement.complete("1", "t") and not tx.agreement.complete("1", "t")
            tx.agreement.insert_ratings([RatingRow("q", "study:1", "1", "r", "yes", "csv:x")],
                                        "t")
            assert tx.agreement.rated("q", "study:1", "r")
            assert not tx.agreement.rated("q", "study:1", "other")
    finally:
        index.close()
