"""Dates and times under Retain Longitudinal Temporal Information with Modified Dates.

One keyed offset per patient, ``days`` (negative) plus ``minutes`` (0..1439), moves
every DA, TM and DT of the patient as one combined date-time, so the interval
between any two events of a patient survives, across midnight too:

* a DA whose paired TM (``StudyDate``/``StudyTime``, ``XDate``/``XTime``) is in the
  same dataset moves with that time: 23:50 plus 30 minutes lands on the next day;
* a DT moves as a whole (the time-zone suffix is kept);
* a TM moves by the minutes, modulo 24 hours: the time part of the combined shift,
  so a shifted DA/TM pair still equals the shifted DT built from it;
* a DA without a time moves by the days (it is read as midnight).

Values keep their precision (``HHMM`` stays ``HHMM``); a time given to the hour
only is truncated to the hour after shifting. Re-identification applies the same
offset in reverse (``reverse=True``), which undoes each rule exactly.

Hand-written rather than datetime-based because DICOM values are partial (``YYYY``,
``HHMM``, fractions, offsets) and must come back in the precision they had.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cache
from itertools import pairwise

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

# Written into DeidentificationMethod when times were shifted with the dates, so
# re-identification knows whether to move times back (objects de-identified before
# times were shifted say nothing, and their times were never moved).
TIMES_SHIFTED = "Modified Dates: times shifted with dates"

_MINUTES_PER_DAY = 1440
_TM_RE = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")
_DT_RE = re.compile(
    r"(?P<y>\d{4})(?P<m>\d{2})?(?P<d>\d{2})?(?P<H>\d{2})?(?P<M>\d{2})?"
    r"(?P<rest>\d{2}(\.\d{1,6})?)?(?P<tz>[+-]\d{4})?"
)


@dataclass(frozen=True)
class TemporalOffset:
    """One patient's shift: ``days`` whole days plus ``minutes`` (0..1439)."""

    days: int
    minutes: int = 0


def partner_time_tag(tag: int) -> int | None:
    """The TM tag paired with a DA tag (``XDate`` -> ``XTime``), or None."""
    return _partner(tag)


@cache
def _partner(tag: int) -> int | None:
    keyword = keyword_for_tag(tag)
    if not keyword or "Date" not in keyword:
        return None
    partner = tag_for_keyword(keyword.replace("Date", "Time"))
    if partner is None or dictionary_VR(partner) != "TM":
        return None
    return partner


def shift_value(vr: str, value: str, offset: TemporalOffset, *, time: str | None = None,
                reverse: bool = False) -> str | None:
    """One DA, TM or DT value shifted by ``offset`` (backwards if ``reverse``); a DA
    is shifted together with ``time``, its paired TM value, when that is readable.
    None if the value is not a date or time this function can read (the caller
    then empties it). A TM of eight or more digits is a date-time (legacy data)."""
    text = value.strip()
    if not text:
        return ""
    sign = -1 if reverse else 1
    days, minutes = sign * offset.days, sign * offset.minutes
    if vr == "TM":
        if len(text.split(".")[0]) >= 8:
            vr = "DT"
        else:
            return _shift_time(text, minutes)
    if vr == "DA":
        if len(text) != 8 or not text.isdigit():
            return None
        carry = 0
        parsed = None if time is None else _time_minutes(time.strip())
        if parsed is not None:
            carry = (parsed + minutes) // _MINUTES_PER_DAY
        return _shift_ymd(text, 8, days + carry)
    return _shift_datetime(text, days, minutes)


def shift_values(vr: str, values: list[str], offset: TemporalOffset, *,
                 times: list[str] | None = None, reverse: bool = False) -> list[str] | None:
    """Every value of one element shifted; ``times`` are the paired TM's values,
    used value by value when there are as many of them. None if any value is
    unreadable."""
    if times is not None and len(times) != len(values):
        times = None
    shifted = []
    for i, value in enumerate(values):
        moved = shift_value(vr, value, offset, time=None if times is None else times[i],
                            reverse=reverse)
        if moved is None:
            return None
        shifted.append(moved)
    return shifted


def _time_minutes(text: str) -> int | None:
    match = _TM_RE.fullmatch(text)
    if match is None:
        return None
    hours, mins = int(match[1]), int(match[2] or 0)
    if hours > 23 or mins > 59 or (match[3] is not None and int(match[3]) > 60):
        return None
    return hours * 60 + mins


def _shift_time(text: str, minutes: int) -> str | None:
    total = _time_minutes(text)
    if total is None:
        return None
    match = _TM_RE.fullmatch(text)
    moved = (total + minutes) % _MINUTES_PER_DAY
    hours, mins = divmod(moved, 60)
    if match[2] is None:
        return f"{hours:02d}"
    return f"{hours:02d}{mins:02d}" + text[4:]


def _shift_datetime(text: str, days: int, minutes: int) -> str | None:
    match = _DT_RE.fullmatch(text)
    if match is None:
        return None
    parts = [match[k] for k in ("m", "d", "H", "M", "rest")]
    # Components are only valid in order: a day needs a month, an hour a day, ...
    if any(later is not None and earlier is None for earlier, later in pairwise(parts)):
        return None
    tz = match["tz"] or ""
    if match["H"] is None:
        precision = 4 + 2 * (match["m"] is not None) + 2 * (match["d"] is not None)
        padded = match["y"] + (match["m"] or "01") + (match["d"] or "01")
        shifted = _shift_ymd(padded, precision, days)
        return None if shifted is None else shifted + tz
    clock = match["H"] + (match["M"] or "")
    total = _time_minutes(clock)
    if total is None:
        return None
    carry, moved = divmod(total + minutes, _MINUTES_PER_DAY)
    day = _shift_ymd(match["y"] + match["m"] + match["d"], 8, days + carry)
    if day is None:
        return None
    hours, mins = divmod(moved, 60)
    time = f"{hours:02d}" if match["M"] is None else f"{hours:02d}{mins:02d}"
    return day + time + (match["rest"] or "") + tz


def _shift_ymd(yyyymmdd: str, precision: int, days: int) -> str | None:
    try:
        moved = date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8])) + timedelta(days)
    except (ValueError, OverflowError):
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"[:precision]
