"""Dates and times under the three longitudinal settings (issue 16 §1)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.anonymize.anonymizer import Deidentifier
from node.anonymize.report import study_report
from node.anonymize.settings import DeidSettings
from node.anonymize.temporal import (
    TIMES_SHIFTED,
    TemporalOffset,
    partner_time_tag,
    shift_value,
    shift_values,
)
from tests.test_anonymize_engine import KEY, ct

pytestmark = pytest.mark.usefixtures("quiet_pydicom_validation")

OFFSET = TemporalOffset(days=-10, minutes=45)


@pytest.mark.parametrize(
    ("vr", "value", "offset", "time", "expected"),
    [
        ("DA", "20200301", TemporalOffset(-1), None, "20200229"),
        ("DA", "20200301", TemporalOffset(365), None, "20210301"),
        ("DA", "2020-03-01", TemporalOffset(-1), None, None),
        ("DA", "20200230", TemporalOffset(-1), None, None),
        ("DA", "", TemporalOffset(-1), None, ""),
        ("DT", "20200301101112.5+0100", TemporalOffset(-1), None, "20200229101112.5+0100"),
        ("DT", "202003", TemporalOffset(-40), None, "202001"),
        ("DT", "2020", TemporalOffset(-1), None, "2019"),
        ("TM", "20200301101112", TemporalOffset(-1), None, "20200229101112"),
        # Issue 16: times move by the minutes, dates with their paired time.
        ("TM", "101112.25", OFFSET, None, "105612.25"),
        ("TM", "233000", OFFSET, None, "001500"),      # across midnight, modulo 24 h
        ("TM", "2330", OFFSET, None, "0015"),          # precision kept
        ("TM", "23", OFFSET, None, "23"),              # hours only: 23:45 truncated
        ("TM", "25", OFFSET, None, None),              # not a time: emptied
        ("DA", "20200301", OFFSET, "233000", "20200221"),  # 23:30 + 45 min: next day
        ("DA", "20200301", OFFSET, "101112", "20200220"),
        ("DA", "20200301", OFFSET, None, "20200220"),  # no time: midnight
        ("DT", "20200301233000.5-0500", OFFSET, None, "20200221001500.5-0500"),
        ("DT", "2020030123", OFFSET, None, "2020022023"),
        ("DT", "20200301", OFFSET, None, "20200220"),
    ],
)
def test_shift_value(vr, value, offset, time, expected):
    assert shift_value(vr, value, offset, time=time) == expected


@pytest.mark.parametrize(("vr", "value", "time"), [
    ("DA", "20200301", "233000"), ("DA", "20200301", None), ("TM", "233000.5", None),
    ("TM", "0010", None), ("DT", "20200301233000.5-0500", None), ("DA", "20201231", "2359"),
])
def test_reverse_undoes_a_shift_exactly(vr, value, time):
    """What re-identification relies on: the pair is undone from the shifted pair."""
    shifted = shift_value(vr, value, OFFSET, time=time)
    shifted_time = None if time is None else shift_value("TM", time, OFFSET)
    assert shift_value(vr, shifted, OFFSET, time=shifted_time, reverse=True) == value


def test_a_da_pairs_with_its_tm_by_keyword():
    assert partner_time_tag(0x00080020) == 0x00080030  # StudyDate -> StudyTime
    assert partner_time_tag(0x00181200) == 0x00181201  # DateOfLastCalibration
    assert partner_time_tag(0x00100030) == 0x00100032  # PatientBirthDate
    assert partner_time_tag(0x00080060) is None        # Modality


def test_multi_valued_pairs_shift_value_by_value():
    assert shift_values("DA", ["20200301", "20200302"], OFFSET, times=["233000", "010000"]) == [
        "20200221", "20200221"]
    # Counts that differ cannot be paired: dates move by their days alone.
    assert shift_values("DA", ["20200301", "20200302"], OFFSET, times=["233000"]) == [
        "20200220", "20200221"]


def _moment(date: str, time: str) -> datetime:
    return datetime.strptime(date + time[:6], "%Y%m%d%H%M%S")


def test_times_shift_with_dates_by_one_offset_and_intervals_survive_midnight():
    item = Dataset()
    item.InstanceCreationDate = "20200302"
    item.InstanceCreationTime = "000500"
    ds = ct(StudyDate="20200301", StudyTime="233000", SeriesDate="20200301",
            SeriesTime="235500", AcquisitionDate="20200302", AcquisitionTime="001500.250",
            AcquisitionDateTime="20200302001500.250", ContentTime="234000",
            AnatomicRegionSequence=Sequence([item]))
    result = Deidentifier(DeidSettings(), KEY).deidentify(ds)
    out = result.dataset
    offset = KEY.temporal_offset("NORTH", "MRN001")
    assert out.StudyTime != "233000"
    delta = timedelta(days=offset.days, minutes=offset.minutes)
    pairs = [("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"),
             ("AcquisitionDate", "AcquisitionTime")]
    for date_kw, time_kw in pairs:
        before = _moment(ds[date_kw].value, ds[time_kw].value)
        assert _moment(out[date_kw].value, out[time_kw].value) == before + delta, date_kw
    inner = out.AnatomicRegionSequence[0]  # at any depth
    assert _moment(inner.InstanceCreationDate,
                   inner.InstanceCreationTime) == _moment("20200302", "000500") + delta
    # The 45 minutes from study to acquisition, across midnight, are still 45 minutes.
    assert (_moment(out.AcquisitionDate, out.AcquisitionTime)
            - _moment(out.StudyDate, out.StudyTime)) == timedelta(minutes=45)
    # The DA/TM pair is the DT built from it; fractions are kept.
    assert out.AcquisitionDateTime == out.AcquisitionDate + out.AcquisitionTime
    assert out.AcquisitionTime.endswith(".250")
    # A lone TM moves by the time-of-day part of the same offset.
    assert out.ContentTime == ((_moment("20200301", "234000") + delta).strftime("%H%M%S"))
    assert TIMES_SHIFTED in out.DeidentificationMethod
    assert result.evidence.temporal == "shifted"
    assert "StudyTime" in result.evidence.date_shifted
    patient = result.entries[0]
    assert (patient.date_offset_days, patient.time_offset_minutes) == (offset.days,
                                                                       offset.minutes)


def test_off_follows_the_table_for_times_and_full_keeps_them():
    ds = ct(StudyTime="101112", SeriesTime="101500", ContentTime="101530")
    off = Deidentifier(DeidSettings(retain_longitudinal="off"), KEY).deidentify(ds)
    assert off.dataset.StudyTime in (None, "")          # Z
    assert off.dataset.SeriesTime == "000000"           # X/D: a dummy
    assert off.dataset.ContentTime == "000000"          # Z/D: a dummy
    assert off.evidence.temporal == "table"
    assert TIMES_SHIFTED not in off.dataset.DeidentificationMethod
    full = Deidentifier(DeidSettings(retain_longitudinal="full"), KEY).deidentify(ds)
    assert (full.dataset.StudyTime, full.dataset.SeriesTime) == ("101112", "101500")
    assert full.evidence.temporal == "kept"


def test_the_same_patient_gets_the_same_time_offset_and_another_patient_another():
    a = KEY.temporal_offset("NORTH", "MRN001")
    assert a == KEY.temporal_offset("NORTH", "MRN001")
    assert 0 <= a.minutes < 1440 and a.days < 0
    assert len({KEY.temporal_offset("NORTH", str(i)).minutes for i in range(50)}) > 40


def test_the_report_says_how_dates_and_times_were_handled():
    ds = ct(StudyTime="101112")
    shifted = Deidentifier(DeidSettings(), KEY).deidentify(ds).evidence.as_dict()
    off = Deidentifier(DeidSettings(retain_longitudinal="off"), KEY).deidentify(ds)
    older = off.evidence.as_dict()
    del older["temporal"], older["residual_phi_values"]  # evidence stored before issue 16
    report = study_report([shifted, off.evidence.as_dict(), older], study_uid="2.25.1")
    line = next(x for x in report.splitlines() if x.startswith("Dates and times: "))
    assert "every date and time shifted by one per-patient offset (Modified Dates) (1 of 3" in line
    assert "as Table E.1-1 says (1 of 3 instances)" in line
    assert "not recorded" in line
