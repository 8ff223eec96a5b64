"""Person-name keys: the one normalised form the index writer and the matcher share.

PS3.4 C.2.2.2.1 lets PN matching be insensitive to case, accents and empty
trailing components. Lamina matches that way (as most archives do, and as an
annotator typing ``müller*`` into Horos expects), so ``Müller^Jürgen``,
``MULLER^JURGEN^^`` and ``muller^jurgen`` are the same name. Keeping the
normalised form in its own indexed column makes such a match an index range
scan instead of a function call per row.

A PN value has up to three component groups, ``alphabetic=ideographic=phonetic``.
Each is keyed on its own: accents are removed only from the alphabetic group,
because in ideographic and phonetic groups a combining mark changes the name
(``が`` is not ``か``).
"""

from __future__ import annotations

import unicodedata

#: (alphabetic, ideographic, phonetic) keys; None where the group is empty.
PNKeys = tuple[str | None, str | None, str | None]


def _strip_components(group: str) -> str:
    """Trim each ``^`` component and drop empty trailing ones (``DOE^JOHN^^`` → ``DOE^JOHN``)."""
    components = [c.strip() for c in group.split("^")]
    while components and not components[-1]:
        components.pop()
    return "^".join(components)


def alphabetic_key(group: str) -> str:
    """Upper case, compatibility-decomposed, without combining marks."""
    decomposed = unicodedata.normalize("NFKD", group)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _strip_components(bare.upper())


def other_key(group: str) -> str:
    """Ideographic or phonetic group: composed and case-folded, marks kept."""
    return _strip_components(unicodedata.normalize("NFKC", group).upper())


def keys(value: str | None) -> PNKeys:
    """The three group keys of a stored or queried PN value."""
    if not value:
        return (None, None, None)
    groups = ([*value.split("="), "", ""])[:3]
    alpha = alphabetic_key(groups[0]) or None
    ideo = other_key(groups[1]) or None
    phon = other_key(groups[2]) or None
    return (alpha, ideo, phon)
