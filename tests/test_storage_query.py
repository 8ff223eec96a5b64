"""The matching engine on a small hand-made index: every matching type, level and model."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node import status
from node.phantom import index_records
from node.storage import pn
from node.storage.postgresql import matcher as pg_matcher
from node.storage.postgresql.index import PostgresIndex
from node.storage.query import (
    KEYS,
    AnyOf,
    EmptyValue,
    Exact,
    IntIn,
    Level,
    Matcher,
    ModalityInStudy,
    Model,
    PersonName,
    QueryError,
    Range,
    UidIn,
    Wildcard,
    parse,
)
from node.storage.records import InstanceRecord, Receipt
from node.storage.sqlite.index import SqliteIndex
from node.storage.sqlite.matcher import (
    COLUMNS,
    build_select,
    explain,
    instances_select,
    returned_columns,
    rows_select,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.11"

# (patient id, name, study uid, date, time, accession, description, [(series modality, n)])
STUDIES = [
    ("PID-1", "Doe^John", "1.9.1", "20240101", "083000", "ACC-1", "Chest CT",
     [("CT", 3), ("SR", 1)]),
    ("PID-1", "Doe^John", "1.9.2", "20240215", "1400", "ACC-2", "Brain MR", [("MR", 2)]),
    ("PID-2", "Müller^Jürgen", "1.9.3", "20231231", "235959.5", "ACC-3", "PET CT",
     [("CT", 1), ("PT", 1)]),
    ("PID-3", "Yamada^Tarou=山田^太郎=やまだ^たろう", "1.9.4", "20240301", "101010", "ACC-4",
     "Abdomen US", [("US", 1)]),
    ("PID-4", "O'Brien^Ann", "1.9.5", "20240101", "120000", "ACC-5", "[weird]*", [("CR", 1)]),
    ("PID-5", None, "1.9.6", None, None, None, None, [("OT", 1)]),
]


def _records():
    for pid, name, study, date, time, acc, desc, series in STUDIES:
        for s, (modality, count) in enumerate(series, start=1):
            for n in range(1, count + 1):
                rec = InstanceRecord(
                    patient_id=pid, issuer_of_patient_id="", patient_name=name,
                    patient_birth_date="19700101", patient_sex="O",
                    study_instance_uid=study, study_date=date, study_time=time,
                    accession_number=acc, study_id="1", study_description=desc,
                    referring_physician_name="Smith^Ref", series_instance_uid=f"{study}.{s}",
                    modality=modality, series_number=s, series_description=None,
                    sop_instance_uid=f"{study}.{s}.{n}", sop_class_uid=SR if modality == "SR" else CT,
                    instance_number=n, content_date=date,
                    acquisition_date_time=f"{date}{time or ''}+0100" if date else None)
                yield rec, Receipt(f"{n:064x}", 1, "1.2.840.10008.1.2.1", "TEST", "a", "t")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request, tmp_path_factory) -> Matcher:
    """The same hand-made index on each backend: every matching test runs on both and must
    give the same matches."""
    if request.param == "postgresql":
        index = PostgresIndex(request.getfixturevalue("pg_cluster").database())
    else:
        index = SqliteIndex(tmp_path_factory.mktemp("index") / "index.sqlite3")
    index.migrate()
    with index.transaction() as tx:
        assert tx.instances.bulk_insert(_records()) == 11
    yield index.matcher("LAMINA")
    index.close()


def ident(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def find(engine: Matcher, level: str, model: Model = Model.STUDY_ROOT,
         **keys: object) -> list[Dataset]:
    return [m.dataset() for m in engine.matches(parse(ident(level, **keys), model))]


def studies(engine: Matcher, **keys: object) -> list[str]:
    keys.setdefault("StudyInstanceUID", "")
    return sorted(str(ds.StudyInstanceUID) for ds in find(engine, "STUDY", **keys))


# --- matching types ------------------------------------------------------------------


def test_universal_matching_returns_every_study(engine):
    assert studies(engine) == [f"1.9.{i}" for i in range(1, 7)]
    assert studies(engine, AccessionNumber="*") == studies(engine)


def test_single_value_matching_is_exact_and_case_sensitive(engine):
    assert studies(engine, AccessionNumber="ACC-2") == ["1.9.2"]
    assert studies(engine, AccessionNumber="acc-2") == []
    assert studies(engine, StudyDescription="Chest") == []


def test_uid_list_matching_short_and_long(engine):
    assert studies(engine, StudyInstanceUID=["1.9.1", "1.9.3"]) == ["1.9.1", "1.9.3"]
    many = ["1.9.4"] + [f"2.25.{i}" for i in range(200)]  # bound as one JSON array
    assert studies(engine, StudyInstanceUID=many) == ["1.9.4"]


def test_wildcards_star_and_question_mark(engine):
    assert studies(engine, AccessionNumber="ACC-?") == ["1.9.1", "1.9.2", "1.9.3", "1.9.4",
                                                        "1.9.5"]
    assert studies(engine, AccessionNumber="*-1") == ["1.9.1"]
    assert studies(engine, StudyDescription="*CT") == ["1.9.1", "1.9.3"]
    assert studies(engine, StudyDescription="B?ain*") == ["1.9.2"]


def test_wildcard_treats_glob_brackets_literally(engine):
    assert studies(engine, StudyDescription="[weird]*") == ["1.9.5"]
    assert studies(engine, StudyDescription="[w]*") == []


def test_date_range_closed_and_open_ended(engine):
    assert studies(engine, StudyDate="20240101-20240215") == ["1.9.1", "1.9.2", "1.9.5"]
    assert studies(engine, StudyDate="-20231231") == ["1.9.3"]
    assert studies(engine, StudyDate="20240201-") == ["1.9.2", "1.9.4"]
    assert studies(engine, StudyDate="20240101") == ["1.9.1", "1.9.5"]


def test_time_range_partial_values_cover_their_period(engine):
    assert studies(engine, StudyTime="08-09") == ["1.9.1"]
    assert studies(engine, StudyTime="14") == ["1.9.2"]  # stored "1400"
    assert studies(engine, StudyTime="1200-") == ["1.9.2", "1.9.3", "1.9.5"]
    assert studies(engine, StudyTime="235959") == ["1.9.3"]  # stored with a fraction


def test_datetime_range_ignores_offsets_and_fractions(engine):
    def images(value):
        return sorted(str(ds.SOPInstanceUID) for ds in find(
            engine, "IMAGE", SOPInstanceUID="", AcquisitionDateTime=value))

    assert images("20240101083000") == ["1.9.1.1.1", "1.9.1.1.2", "1.9.1.1.3", "1.9.1.2.1"]
    assert images("2024030110-202403011011") == ["1.9.4.1.1"]
    assert images("2023-") == images("2023-2024")
    assert images("202312-20231231") == ["1.9.3.1.1", "1.9.3.2.1"]


def test_empty_value_matching(engine):
    assert studies(engine, AccessionNumber='""') == ["1.9.6"]
    assert studies(engine, PatientName='""') == ["1.9.6"]


def test_integer_keys_and_lists(engine):
    series = find(engine, "SERIES", StudyInstanceUID="1.9.1", SeriesNumber="2",
                  SeriesInstanceUID="")
    assert [str(ds.SeriesInstanceUID) for ds in series] == ["1.9.1.2"]
    bad = ident("SERIES", SeriesInstanceUID="")
    # As received from the wire: pydicom converts the value only when it is read.
    bad[0x00200011] = RawDataElement(Tag(0x00200011), "IS", 4, b"two ", 0, False, True)
    with pytest.raises(QueryError) as err:
        parse(bad, Model.STUDY_ROOT)
    assert err.value.status is status.IDENTIFIER_DOES_NOT_MATCH
    assert "SeriesNumber" in err.value.reason


@pytest.mark.parametrize("bad", [{"StudyDate": "2024-01-01"}, {"StudyDate": "yesterday"},
                                 {"StudyTime": "25:61"}, {"StudyTime": "8am"}])
def test_malformed_range_values_are_refused_with_the_key_named(engine, bad):
    with pytest.raises(QueryError) as err:
        studies(engine, **bad)
    assert err.value.status.code == 0xA900
    assert next(iter(bad)) in err.value.reason


# --- person names ---------------------------------------------------------------------


def test_pn_matching_ignores_case_accents_and_trailing_components(engine):
    assert studies(engine, PatientName="doe*") == ["1.9.1", "1.9.2"]
    assert studies(engine, PatientName="MULLER^JURGEN") == ["1.9.3"]
    assert studies(engine, PatientName="müller^jürgen^^") == ["1.9.3"]
    assert studies(engine, PatientName="o'brien^*") == ["1.9.5"]
    assert studies(engine, PatientName="Doe") == []  # single value: the whole name


def test_pn_component_groups_match_their_own_group(engine):
    assert studies(engine, PatientName="Yamada*") == ["1.9.4"]
    assert studies(engine, PatientName="=山田*") == ["1.9.4"]
    assert studies(engine, PatientName="Yamada*=山田^太郎") == ["1.9.4"]
    assert studies(engine, PatientName="Yamada*=田中*") == []
    assert studies(engine, PatientName="山田*") == []  # alphabetic group is "Yamada^Tarou"


def test_pn_keys_normalise_each_group():
    assert pn.keys("Müller^Jürgen^^") == ("MULLER^JURGEN", None, None)
    assert pn.keys(" doe ^ john =山田^太郎= ") == ("DOE^JOHN", "山田^太郎", None)
    assert pn.keys("=が") == (None, "が", None)  # marks kept outside the alphabetic group
    assert pn.keys(None) == (None, None, None)


def test_referring_physician_is_pn_matched(engine):
    assert len(studies(engine, ReferringPhysicianName="smith*")) == 6


# --- levels, models, return keys ---------------------------------------------------------


def test_modalities_in_study_matches_any_series_and_lists(engine):
    assert studies(engine, ModalitiesInStudy="PT") == ["1.9.3"]
    assert studies(engine, ModalitiesInStudy=["CT", "MR"]) == ["1.9.1", "1.9.2", "1.9.3"]
    assert studies(engine, ModalitiesInStudy="C?") == ["1.9.1", "1.9.3", "1.9.5"]
    [first] = find(engine, "STUDY", StudyInstanceUID="1.9.1", ModalitiesInStudy="")
    assert list(first.ModalitiesInStudy) == ["CT", "SR"]


def test_computed_counts_at_each_level(engine):
    [study] = find(engine, "STUDY", StudyInstanceUID="1.9.1", NumberOfStudyRelatedSeries="",
                   NumberOfStudyRelatedInstances="")
    assert (study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances) == (2, 4)
    [series] = find(engine, "SERIES", SeriesInstanceUID="1.9.1.1",
                    NumberOfSeriesRelatedInstances="")
    assert series.NumberOfSeriesRelatedInstances == 3
    [patient] = find(engine, "PATIENT", Model.PATIENT_ROOT, PatientID="PID-1",
                     NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
                     NumberOfPatientRelatedInstances="")
    assert (patient.NumberOfPatientRelatedStudies, patient.NumberOfPatientRelatedSeries,
            patient.NumberOfPatientRelatedInstances) == (2, 3, 6)


def test_every_level_of_both_models(engine):
    assert len(find(engine, "PATIENT", Model.PATIENT_ROOT, PatientID="")) == 5
    for model in Model:
        assert len(find(engine, "STUDY", model, StudyInstanceUID="")) == 6
        assert len(find(engine, "SERIES", model, StudyInstanceUID="1.9.1",
                        SeriesInstanceUID="")) == 2
        images = find(engine, "IMAGE", model, SeriesInstanceUID="1.9.1.1", SOPInstanceUID="",
                      InstanceNumber="")
        assert sorted(int(ds.InstanceNumber) for ds in images) == [1, 2, 3]


def test_higher_level_keys_match_below_their_level(engine):
    images = find(engine, "IMAGE", PatientName="MÜLLER*", SOPInstanceUID="")
    assert sorted(str(ds.SOPInstanceUID) for ds in images) == ["1.9.3.1.1", "1.9.3.2.1"]


@pytest.mark.parametrize(("model", "level"), [(Model.STUDY_ROOT, "PATIENT"),
                                              (Model.PATIENT_ROOT, "FRAME"),
                                              (Model.STUDY_ROOT, "")])
def test_level_outside_the_model_is_refused(engine, model, level):
    with pytest.raises(QueryError) as err:
        find(engine, level, model, PatientID="")
    assert err.value.status is status.IDENTIFIER_DOES_NOT_MATCH
    assert "QueryRetrieveLevel" in err.value.reason


def test_unsupported_and_lower_level_keys_come_back_empty_and_are_flagged(engine):
    query = parse(ident("STUDY", StudyInstanceUID="1.9.2", OtherPatientIDs="X",
                        Modality="CT", ReferencedStudySequence=[]), Model.STUDY_ROOT)
    assert query.unsupported
    [ds] = [m.dataset() for m in engine.matches(query)]
    assert ds.OtherPatientIDs in (None, "")
    assert ds.Modality in (None, "")  # a SERIES key asked at STUDY level: not matched
    assert list(ds.ReferencedStudySequence) == []
    assert not parse(ident("STUDY", StudyInstanceUID=""), Model.STUDY_ROOT).unsupported


def test_ambiguous_vr_of_an_unsupported_key_is_resolved(engine):
    request = ident("STUDY", StudyInstanceUID="1.9.2")
    request[0x00280106] = RawDataElement(Tag(0x00280106), None, 0, b"", 0, True, True)
    query = parse(request, Model.STUDY_ROOT)
    assert (Tag(0x00280106), "US") in query.empty


def test_level_unique_key_is_always_returned(engine):
    [ds] = find(engine, "SERIES", SeriesInstanceUID="1.9.2.1", RetrieveAETitle="")
    assert ds.SeriesInstanceUID == "1.9.2.1"
    assert ds.RetrieveAETitle == "LAMINA"
    assert ds.QueryRetrieveLevel == "SERIES"


def test_response_character_set(engine):
    def name_and_charset(**extra):
        [ds] = find(engine, "STUDY", StudyInstanceUID="1.9.3", PatientName="", **extra)
        return str(ds.PatientName), ds.get("SpecificCharacterSet")

    assert name_and_charset() == ("Müller^Jürgen", "ISO_IR 192")
    assert name_and_charset(SpecificCharacterSet="ISO_IR 100") == ("Müller^Jürgen",
                                                                   "ISO_IR 100")
    # Latin-1 cannot carry the Japanese groups: the answer switches to UTF-8.
    [ds] = find(engine, "STUDY", StudyInstanceUID="1.9.4", PatientName="",
                SpecificCharacterSet="ISO_IR 100")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    [ds] = find(engine, "STUDY", StudyInstanceUID="1.9.1", PatientName="")
    assert "SpecificCharacterSet" not in ds


# --- safety, streaming, paging, plans -------------------------------------------------------


def test_received_values_are_bounded(engine):
    assert studies(engine, StudyDescription="**Chest***") == ["1.9.1"]  # runs of * are one
    for keys in ({"StudyDescription": "*a" * 20}, {"AccessionNumber": "A" * 300},
                 {"StudyInstanceUID": [f"1.{i}" for i in range(10_001)]}):
        with pytest.raises(QueryError) as err:
            studies(engine, **keys)
        assert err.value.status.code == 0xA900 and next(iter(keys)) in err.value.reason


def test_received_text_never_becomes_sql(engine):
    hostile = "x' OR '1'='1"
    assert studies(engine, PatientName=hostile, AccessionNumber=hostile) == []
    assert studies(engine, StudyInstanceUID="1.9.1'; DROP TABLE study; --") == []
    query = parse(ident("STUDY", PatientName=hostile, StudyDescription="*';--*"),
                  Model.STUDY_ROOT)
    sql, params = build_select(query, [(Level.STUDY, "st.id")])
    assert hostile not in sql and "';--" not in sql
    assert sql.count("?") == len(params)
    assert len(studies(engine)) == 6


def test_matches_are_built_one_at_a_time(engine, monkeypatch):
    from node.storage import query as query_mod

    built = []
    original = query_mod._Layout.match
    monkeypatch.setattr(query_mod._Layout, "match",
                        lambda self, row: built.append(row) or original(self, row))
    stream = engine.matches(parse(ident("IMAGE", SOPInstanceUID=""), Model.STUDY_ROOT))
    first_two = list(itertools.islice(stream, 2))
    assert len(first_two) == 2 and len(built) == 2
    stream.close()


def test_paging_is_stable(engine):
    query = parse(ident("IMAGE", SOPInstanceUID=""), Model.STUDY_ROOT)
    everything = [m.dataset().SOPInstanceUID for m in engine.matches(query, limit=100)]
    pages = [m.dataset().SOPInstanceUID for offset in range(0, 11, 5)
             for m in engine.matches(query, limit=5, offset=offset)]
    assert len(everything) == 11 and pages == everything


def test_retrieve_selects_by_unique_keys_only(engine):
    query = parse(ident("STUDY", StudyInstanceUID="1.9.1", PatientName="NOBODY",
                        AccessionNumber="nothing"), Model.STUDY_ROOT, retrieve=True)
    instances = list(engine.instances(query))
    assert [i.sop_instance_uid for i in instances] == ["1.9.1.1.1", "1.9.1.1.2", "1.9.1.1.3",
                                                       "1.9.1.2.1"]
    assert instances[0].transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert len(instances[0].blob_sha256) == 64
    patient = parse(ident("PATIENT", PatientID="PID-1"), Model.PATIENT_ROOT, retrieve=True)
    assert len(list(engine.instances(patient))) == 6


@pytest.mark.parametrize("keys", [{"StudyInstanceUID": ""}, {"StudyInstanceUID": "*"},
                                  {"PatientID": "PID-1"}])
def test_retrieve_without_its_unique_key_is_refused(engine, keys):
    with pytest.raises(QueryError) as err:
        parse(ident("STUDY", **keys), Model.STUDY_ROOT, retrieve=True)
    assert err.value.status.code == 0xA900 and "StudyInstanceUID" in err.value.reason


BENCHMARK_KEYS = {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": "", "PatientName": ""}
BENCHMARK_CASES = [
    ("STUDY", {"PatientID": "PAT0000007"}), ("STUDY", {"PatientName": "SMITH*"}),
    ("STUDY", {"StudyDate": "20200101-20200107"}), ("STUDY", {"ModalitiesInStudy": "PT"}),
    ("STUDY", {"AccessionNumber": "ACC1"}), ("SERIES", {"StudyInstanceUID": "1.2"}),
    ("IMAGE", {"SeriesInstanceUID": "1.2"})]


def test_listed_benchmark_queries_use_indexes(tmp_path: Path):
    index = SqliteIndex(tmp_path / "index.sqlite3")
    index.migrate()
    with index.transaction() as tx:
        tx.instances.bulk_insert(index_records(50, 200, 4))
    with index.connection() as conn:
        conn.execute("ANALYZE")
    with index.connection() as conn:
        for level, case in BENCHMARK_CASES:
            query = parse(ident(level, **{**BENCHMARK_KEYS, **case}), Model.STUDY_ROOT)
            plan = explain(conn, *build_select(query, returned_columns(query)))
            scans = [line for line in plan if line.startswith("SCAN")]
            assert not scans, (case, plan)
    index.close()


def test_listed_benchmark_queries_can_use_indexes_on_postgresql(pg_cluster):
    """With sequential scans priced out, a plan that still scans a table has no index to
    use (on a small table PostgreSQL rightly prefers a scan, so the price is what is set)."""
    index = PostgresIndex(pg_cluster.database())
    index.migrate()
    with index.transaction() as tx:
        tx.instances.bulk_insert(index_records(50, 200, 4))
    with index.connection() as conn:
        conn.execute("ANALYZE")
        conn.execute("SET enable_seqscan = off")
        for level, case in BENCHMARK_CASES:
            query = parse(ident(level, **{**BENCHMARK_KEYS, **case}), Model.STUDY_ROOT)
            plan = pg_matcher.explain(conn, *pg_matcher.RENDERER.build_select(
                query, returned_columns(query)))
            scans = [line for line in plan if "Seq Scan" in line]
            assert not scans, (case, plan)
    index.close()


# --- the plan (backend-neutral) and its SQLite form ------------------------------------------


def predicate(level: str, keyword: str, value: object):
    [condition] = parse(ident(level, **{keyword: value}), Model.STUDY_ROOT).conditions
    return condition.predicate


def test_parse_decides_the_semantics_as_data():
    assert predicate("STUDY", "AccessionNumber", "ACC-1") == Exact("ACC-1")
    assert predicate("STUDY", "StudyDescription", "**Chest***") == Wildcard("*Chest*")
    assert Wildcard("DOE^J*N?").prefix == "DOE^J" and Wildcard("*X").prefix == ""
    assert predicate("STUDY", "AccessionNumber", '""') == EmptyValue()
    assert predicate("STUDY", "PatientName", "Müller*=山田^太郎") == PersonName(
        Wildcard("MULLER*"), Exact("山田^太郎"), None)
    assert predicate("STUDY", "PatientName", "=*") == PersonName(None, None, None)
    assert predicate("STUDY", "StudyInstanceUID", ["1.2", "1.3"]) == UidIn(("1.2", "1.3"))
    assert predicate("SERIES", "SeriesNumber", ["1", "2"]) == IntIn((1, 2))
    assert predicate("STUDY", "StudyDate", "20240101-") == Range("date", "20240101", None)
    assert predicate("STUDY", "StudyTime", "14") == Range("time", "140000", "145959")
    assert predicate("IMAGE", "AcquisitionDateTime", "2023-0500") == Range(
        "datetime", "20230101000000", "20231231235959")
    assert predicate("IMAGE", "AcquisitionDateTime", "-202403") == Range(
        "datetime", None, "20240331235959")
    assert predicate("STUDY", "ModalitiesInStudy", ["CT", "M?"]) == AnyOf(
        (ModalityInStudy(Exact("CT")), ModalityInStudy(Wildcard("M?"))))


def test_every_stored_key_has_a_sqlite_column():
    assert set(COLUMNS) == {k.keyword for k in KEYS.values() if k.kind != "constant"}


#: Statements as the single-module engine generated them before the backend split: the
#: same text means the same plans, and SQLite's statement cache keeps serving them.
PINNED = [
    (("STUDY", {"StudyInstanceUID": "", "PatientName": "doe*"}),
     "SELECT st.study_instance_uid, p.patient_name FROM study st JOIN patient p"
     " ON p.id = st.patient_fk WHERE (p.patient_name_key >= ? AND p.patient_name_key < ?"
     " AND p.patient_name_key GLOB ?)", ("DOE", "DOF", "DOE*")),
    (("STUDY", {"StudyInstanceUID": "", "StudyDate": "20240101-20240107",
                "ModalitiesInStudy": ["CT", "M?"]}),
     "SELECT st.study_instance_uid, st.study_date, nullif(st.modalities_in_study, '')"
     " FROM study st WHERE st.study_date BETWEEN ? AND ? AND (st.id IN (SELECT x.study_fk"
     " FROM series x WHERE x.modality = ?) OR st.id IN (SELECT x.study_fk FROM series x"
     " WHERE (x.modality >= ? AND x.modality < ? AND x.modality GLOB ?)))",
     ("20240101", "20240107", "CT", "M", "N", "M?")),
    (("IMAGE", {"SOPInstanceUID": "", "StudyTime": "14", "AcquisitionDateTime": "2023-",
                "SeriesNumber": ["1", "2"]}),
     "SELECT i.sop_instance_uid, st.study_time, i.acquisition_date_time, se.series_number"
     " FROM instance i JOIN series se ON se.id = i.series_fk JOIN study st"
     " ON st.id = se.study_fk WHERE (substr(replace(st.study_time, ':', ''), 1, 6)"
     " || substr('000000', length(substr(replace(st.study_time, ':', ''), 1, 6)) + 1))"
     " BETWEEN ? AND ? AND (substr(i.acquisition_date_time, 1, min(14,"
     " instr(i.acquisition_date_time || '+', '+') - 1,"
     " instr(i.acquisition_date_time || '-', '-') - 1,"
     " instr(i.acquisition_date_time || '.', '.') - 1)) || substr('00000101000000',"
     " length(substr(i.acquisition_date_time, 1, min(14,"
     " instr(i.acquisition_date_time || '+', '+') - 1,"
     " instr(i.acquisition_date_time || '-', '-') - 1,"
     " instr(i.acquisition_date_time || '.', '.') - 1))) + 1)) >= ?"
     " AND se.series_number IN (?, ?)",
     ("140000", "145959", "20230101000000", 1, 2)),
    (("SERIES", {"StudyInstanceUID": [f"2.25.{i}" for i in range(51)], "SeriesInstanceUID": "",
                 "NumberOfSeriesRelatedInstances": "", "RetrieveAETitle": ""}),
     "SELECT st.study_instance_uid, se.series_instance_uid, (SELECT count(*) FROM instance z"
     " WHERE z.series_fk = se.id) FROM series se JOIN study st ON st.id = se.study_fk"
     " WHERE st.study_instance_uid IN (SELECT value FROM json_each(?))",
     ('["' + '", "'.join(f"2.25.{i}" for i in range(51)) + '"]',)),
    (("STUDY", {"StudyInstanceUID": "", "PatientName": "Yamada*=山田^太郎",
                "AccessionNumber": '""'}),
     "SELECT st.study_instance_uid, p.patient_name, st.accession_number FROM study st"
     " JOIN patient p ON p.id = st.patient_fk WHERE (p.patient_name_key >= ?"
     " AND p.patient_name_key < ? AND p.patient_name_key GLOB ?)"
     " AND p.patient_name_ideographic_key = ?"
     " AND (st.accession_number IS NULL OR st.accession_number = '')",
     ("YAMADA", "YAMADB", "YAMADA*", "山田^太郎")),
]


@pytest.mark.parametrize(("request_", "sql", "params"), PINNED)
def test_compiled_sql_is_pinned(request_, sql, params):
    level, keys = request_
    assert rows_select(parse(ident(level, **keys), Model.STUDY_ROOT)) == (sql, params)


def test_paging_and_retrieve_statements_are_pinned():
    query = parse(ident("IMAGE", SOPInstanceUID=""), Model.STUDY_ROOT)
    assert rows_select(query, limit=5, offset=10) == (
        "SELECT i.sop_instance_uid FROM instance i ORDER BY i.id LIMIT ? OFFSET ?", (5, 10))
    retrieve = parse(ident("STUDY", StudyInstanceUID=["1.2", "1.3"]), Model.STUDY_ROOT,
                     retrieve=True)
    assert instances_select(retrieve) == (
        "SELECT i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax_uid, i.blob_sha256"
        " FROM instance i JOIN series se ON se.id = i.series_fk JOIN study st"
        " ON st.id = se.study_fk WHERE st.study_instance_uid IN (?, ?)"
        " ORDER BY se.study_fk, se.series_number, se.id, i.instance_number, i.id",
        ("1.2", "1.3"))
