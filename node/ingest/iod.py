"""What the standard requires of each SOP class, compiled from highdicom's copy of its tables.

highdicom ships PS3.3 as data (``highdicom/_standard/*.json``): SOP class →
IOD → modules (with usage) → attributes (with type and nesting path). We keep
what can be checked without evaluating conditions: the Type 1 and Type 2
attributes of the IOD's *mandatory* modules, at the top level and inside any
sequence item that is present. Conditional (1C/2C) attributes and
user-optional or conditional modules are not checked: their conditions are
prose in the standard, not data.

The raw tables take ~0.7 s and ~150 MB to load, so they are compiled once into
a compact JSON cache (a few MB, keyed by highdicom's version) that every
receiving process reads in milliseconds; each IOD in it is built on first use.
"""

from __future__ import annotations

import json
import os
import pkgutil
import threading
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from pydicom.datadict import tag_for_keyword

#: Functional group sequences: the tables flatten every functional-group macro
#: under both of them as Type 1, while the standard puts each macro in one or
#: the other (and some only conditionally). Their contents are not checked.
FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")

#: Modules whose attributes depend on each content item's ValueType: the tables
#: flatten every value type's macro into one list of Type 1 attributes. Only
#: the attributes named here are checked.
VALUE_TYPE_MODULES = {"sr-document-content": frozenset({"ValueType"})}

_TYPE_RANK = {"1": 2, "2": 1}


@dataclass(frozen=True)
class Requirement:
    """One attribute the IOD requires: Type 1 (present, not empty) or Type 2 (present)."""

    tag: int
    keyword: str
    type: str


@dataclass(frozen=True)
class IOD:
    """The checkable requirements of one IOD, by sequence path (``()`` is the top level)."""

    name: str
    requirements: dict[tuple[str, ...], tuple[Requirement, ...]]
    #: path → (keyword, tag) of the sequences below it that have requirements inside
    children: dict[tuple[str, ...], tuple[tuple[str, int], ...]]

    @property
    def top_level(self) -> tuple[Requirement, ...]:
        return self.requirements.get((), ())


class IODTables:
    """SOP Class UID → :class:`IOD`.

    Each IOD is built the first time an instance of it arrives, from its own
    JSON text in the cache: all 171 built up front cost every process ~35 MB,
    and a node sees a handful (CT, MR, SEG ...).
    """

    def __init__(self, compiled: dict) -> None:
        self._texts: dict[str, str] = compiled["iods"]  # IOD name → its requirements as JSON
        self._iods: dict[str, IOD] = {}
        self._sop_classes: dict[str, str] = compiled["sop_classes"]

    def for_sop_class(self, sop_class_uid: str) -> IOD | None:
        name = self._sop_classes.get(sop_class_uid)
        if not name or name not in self._texts:
            return None
        iod = self._iods.get(name)
        if iod is None:  # two threads may both build it: the same value, either is kept
            iod = self._iods[name] = _iod(name, json.loads(self._texts[name]))
        return iod

    @classmethod
    def load(cls, cache_dir: Path | None = None) -> IODTables:
        """Read the compiled cache for this highdicom version, compiling it on first use."""
        with _lock:
            key = version("highdicom")  # importing highdicom for it would cost ~20 MB
            if key in _loaded:
                return _loaded[key]
            cache_dir = cache_dir or default_cache_dir()
            path = cache_dir / f"iod-requirements-{_CACHE_FORMAT}-highdicom-{key}.json"
            try:
                compiled = json.loads(path.read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                compiled = compile_tables()
                compiled["iods"] = {name: json.dumps(paths, separators=(",", ":"))
                                    for name, paths in compiled["iods"].items()}
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(compiled), encoding="utf-8")
                os.replace(tmp, path)
            _loaded[key] = cls(compiled)
            return _loaded[key]


def default_cache_dir() -> Path:
    """The user's cache folder: the compiled tables depend only on the installed
    highdicom, so every node (and every test's data folder) shares one copy."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lamina"


def _iod(name: str, paths: dict[str, list]) -> IOD:
    requirements = {tuple(filter(None, path.split("/"))): tuple(Requirement(*r) for r in reqs)
                    for path, reqs in paths.items()}
    children: dict[tuple[str, ...], set[str]] = {}
    for path in requirements:
        for depth in range(len(path)):
            children.setdefault(path[:depth], set()).add(path[depth])
    return IOD(name, requirements, {
        p: tuple((k, tag_for_keyword(k)) for k in sorted(keys) if tag_for_keyword(k) is not None)
        for p, keys in children.items()})


_lock = threading.Lock()
#: In the cache file's name: format 2 holds each IOD as its own JSON text (built lazily).
_CACHE_FORMAT = "v2"
_loaded: dict[str, IODTables] = {}


def _table(name: str) -> dict | list:
    data = pkgutil.get_data("highdicom", f"_standard/{name}.json")
    if data is None:
        raise FileNotFoundError(f"highdicom's {name}.json is missing")
    return json.loads(data)


def compile_tables() -> dict:
    """Reduce highdicom's tables to the checkable requirements of every IOD."""
    sop_classes = _table("sop_class_iod_map")
    iod_modules = _table("iod_module_map")
    module_attributes = _table("module_attribute_map")
    iods: dict[str, dict[str, list]] = {}
    for iod_name in set(sop_classes.values()):
        merged: dict[tuple[str, str], str] = {}
        for module in iod_modules.get(iod_name, []):
            if module["usage"] != "M":
                continue
            only = VALUE_TYPE_MODULES.get(module["key"])
            for attr in module_attributes.get(module["key"], []):
                kind, path = attr["type"], attr["path"]
                if kind not in _TYPE_RANK or (path and path[0] in FUNCTIONAL_GROUPS):
                    continue
                if only is not None and (path or attr["keyword"] not in only):
                    continue
                key = ("/".join(path), attr["keyword"])
                if _TYPE_RANK[kind] > _TYPE_RANK.get(merged.get(key, ""), 0):
                    merged[key] = kind
        paths: dict[str, list] = {}
        for (path, keyword), kind in sorted(merged.items()):
            tag = tag_for_keyword(keyword)
            if tag is not None:
                paths.setdefault(path, []).append([tag, keyword, kind])
        iods[iod_name] = paths
    return {"highdicom": version("highdicom"), "sop_classes": sop_classes, "iods": iods}
