"""Chance-corrected agreement on categorical labels, computed exactly.

Cohen's kappa for two raters and Fleiss' kappa for three or more, over
:class:`fractions.Fraction`: the same labels always give the same rational
number (``1/2``, never ``0.49999999999999994``), so a kappa recorded in the
index, printed in the QA report and checked against the protocol's threshold
is one value, and tests can state it exactly. Written here rather than taken
from scikit-learn or statsmodels because both compute in floating point (and
neither is a dependency of the node); the formulas are the textbook ones:

* Cohen (1960): ``κ = (p_o − p_e) / (1 − p_e)`` with ``p_o`` the observed
  agreement and ``p_e = Σ_k p_a(k)·p_b(k)`` from each rater's own marginals.
* Fleiss (1971): ``κ = (P̄ − P̄_e) / (1 − P̄_e)`` with ``P̄`` the mean per-item
  agreement among the ``n`` ratings of each item and ``P̄_e = Σ_j p_j²`` from
  the pooled category proportions. Every item must carry the same number of
  ratings.

When chance agreement is already certain (``p_e = 1``: every rating is the
same one category) kappa is undefined and ``None`` is returned; callers show
it as "n/a" rather than invent a number.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from fractions import Fraction


class KappaError(ValueError):
    """The ratings cannot give a kappa (no items, a missing rating, unequal rater counts)."""


def cohen_kappa(pairs: Iterable[tuple[Hashable, Hashable]]) -> Fraction | None:
    """Cohen's kappa of two raters' labels, one ``(rater A, rater B)`` pair per item."""
    items = list(pairs)
    n = len(items)
    if n == 0:
        raise KappaError("no item was rated by both raters")
    observed = Fraction(sum(1 for a, b in items if a == b), n)
    first = Counter(a for a, _ in items)
    second = Counter(b for _, b in items)
    expected = Fraction(sum(first[k] * second[k] for k in first), n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def fleiss_kappa(items: Sequence[Sequence[Hashable]]) -> Fraction | None:
    """Fleiss' kappa: one sequence of labels per item, the same number of ratings (≥ 2) each."""
    if not items:
        raise KappaError("no item was rated")
    raters = len(items[0])
    if raters < 2:
        raise KappaError("each item needs at least two ratings")
    if any(len(labels) != raters for labels in items):
        raise KappaError("every item must carry the same number of ratings")
    count = len(items)
    totals: Counter[Hashable] = Counter()
    agreement = Fraction(0)
    for labels in items:
        per_category = Counter(labels)
        totals.update(per_category)
        agreement += Fraction(sum(c * c for c in per_category.values()) - raters,
                              raters * (raters - 1))
    mean_agreement = agreement / count
    expected = sum((Fraction(t, count * raters) ** 2 for t in totals.values()), Fraction(0))
    if expected == 1:
        return None
    return (mean_agreement - expected) / (1 - expected)


def kappa(ratings: dict[Hashable, dict[Hashable, Hashable]]) -> tuple[str, Fraction | None, int]:
    """The kappa that fits ``{item: {rater: label}}``: (method, value, items used).

    Two raters overall → Cohen over the items both rated; three or more →
    Fleiss over the items carrying the most common number of ratings (≥ 2).
    Items rated once say nothing about agreement and are left out.
    """
    raters = {r for labels in ratings.values() for r in labels}
    if len(raters) < 2:
        raise KappaError("fewer than two raters")
    if len(raters) == 2:
        a, b = sorted(raters, key=str)
        pairs = [(labels[a], labels[b]) for labels in ratings.values()
                 if a in labels and b in labels]
        return "cohen", cohen_kappa(pairs), len(pairs)
    sizes = Counter(len(labels) for labels in ratings.values() if len(labels) >= 2)
    if not sizes:
        raise KappaError("no item was rated by two raters")
    size = max(sizes, key=lambda s: (sizes[s], s))
    used = [list(labels.values()) for labels in ratings.values() if len(labels) == size]
    return "fleiss", fleiss_kappa(used), len(used)
