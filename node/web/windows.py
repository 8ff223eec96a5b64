"""Which window a rendered image is shown in (issue 12 §3): the query's, else the
labelling protocol's preset for the class annotated on its series, else (decided by
:func:`node.web.pixels.frame_image`) the instance's own.

The class comes from the current checks of the series' annotations (the
structures' ``class_key``), so a series with a lung nodule annotated opens in
the lung window on the review page and in WADO-RS rendered alike.
"""

from __future__ import annotations

from node.annotations.states import AnnotationState
from node.checks.protocol import Protocol
from node.storage.interface import Reader
from node.web.pixels import parse_window


def class_window(protocol: Protocol, class_keys: list[str | None]) -> tuple[float, float] | None:
    """The review window of the first of ``class_keys`` whose protocol class names one."""
    windows = {c.key: c.window for c in protocol.classes if c.window}
    for key in class_keys:
        if key in windows:
            return protocol.windows[windows[key]]
    return None


def series_classes(reader: Reader, series_uid: str) -> list[str | None]:
    """Class keys of the structures of the series' checked annotations, oldest first."""
    keys: list[str | None] = []
    for row in reader.annotations.list(series_uid=series_uid):
        if row["current_check_fk"] is None or row["state"] == AnnotationState.REFUSED:
            continue
        keys += [s["class_key"] for s in reader.annotations.structures(row["current_check_fk"])]
    return keys


def chosen_window(text: str | None, protocol: Protocol, reader: Reader,
                  series_uid: str | None) -> tuple[float, float] | None:
    """The query's ``window`` (center,width or a preset name), else the class preset of
    the series (when known)."""
    window = parse_window(text, protocol.windows)
    if window is None and series_uid:
        window = class_window(protocol, series_classes(reader, series_uid))
    return window
