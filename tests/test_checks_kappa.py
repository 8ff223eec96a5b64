"""Exact kappas (node.checks.kappa) on label sets whose values were worked out by hand."""

from __future__ import annotations

from fractions import Fraction

import pytest

from node.checks.kappa import KappaError, cohen_kappa, fleiss_kappa, kappa


def _table(yy: int, yn: int, ny: int, nn: int) -> list[tuple[str, str]]:
    """Two raters' yes/no labels from the cells of their 2×2 agreement table."""
    return [("y", "y")] * yy + [("y", "n")] * yn + [("n", "y")] * ny + [("n", "n")] * nn


@pytest.mark.parametrize(("cells", "expected"), [
    # n=4: p_o = 3/4; A says yes 1×, B 2× → p_e = (1·2 + 3·2)/16 = 1/2; κ = (1/4)/(1/2)
    ((1, 0, 1, 2), Fraction(1, 2)),
    # n=8: p_o = 7/8; A yes 3, B yes 4 → p_e = (3·4 + 5·4)/64 = 1/2; κ = (3/8)/(1/2)
    ((3, 0, 1, 4), Fraction(3, 4)),
    # n=7: p_o = 6/7; A yes 3, B yes 4 → p_e = (12 + 12)/49; κ = (18/49)/(25/49)
    ((3, 0, 1, 3), Fraction(18, 25)),
    # n=125: p_o = 104/125; A yes 43, B yes 58 → Σ = 43·58 + 82·67 = 7988;
    # κ = (104·125 − 7988)/(125² − 7988) = 5012/7637 = (7·716)/(7·1091)
    ((40, 3, 18, 64), Fraction(716, 1091)),
    # perfect agreement, and agreement no better than chance
    ((2, 0, 0, 2), Fraction(1)),
    ((1, 1, 1, 1), Fraction(0)),
])
def test_cohen_kappa_is_exact(cells, expected):
    value = cohen_kappa(_table(*cells))
    assert isinstance(value, Fraction)
    assert value == expected


def test_cohen_kappa_with_three_categories():
    # n=5: agreements a-a, b-b, c-c; disagreements a-b, c-a → p_o = 3/5;
    # A: a 2, b 1, c 2; B: a 2, b 2, c 1 → p_e = (4 + 2 + 2)/25 = 8/25; κ = (7/25)/(17/25)
    pairs = [("a", "a"), ("b", "b"), ("c", "c"), ("a", "b"), ("c", "a")]
    assert cohen_kappa(pairs) == Fraction(7, 17)


@pytest.mark.parametrize(("items", "expected"), [
    # 3 raters, 4 items: per-item agreement 1, 1, 1/3, 1/3 → P̄ = 2/3;
    # yes share 6/12 → P̄_e = 1/2; κ = (1/6)/(1/2)
    ([["y"] * 3, ["n"] * 3, ["y", "y", "n"], ["y", "n", "n"]], Fraction(1, 3)),
    # per-item 1, 1, 1, 1/3 → P̄ = 5/6; yes share 8/12 → P̄_e = 4/9 + 1/9 = 5/9;
    # κ = (5/6 − 5/9)/(4/9) = 5/8
    ([["y"] * 3, ["y"] * 3, ["n"] * 3, ["y", "y", "n"]], Fraction(5, 8)),
    # 4 raters, 3 categories, 3 items: (4,0,0) (0,4,0) (2,1,1): P_i = 1, 1, (6−4)/12 = 1/6
    # → P̄ = 13/18; shares a 6/12, b 5/12, c 1/12 → P̄_e = (36 + 25 + 1)/144 = 31/72;
    # κ = (52/72 − 31/72)/(41/72) = 21/41
    ([["a"] * 4, ["b"] * 4, ["a", "a", "b", "c"]], Fraction(21, 41)),
])
def test_fleiss_kappa_is_exact(items, expected):
    assert fleiss_kappa(items) == expected


def test_kappa_picks_cohen_for_two_raters_and_fleiss_for_three():
    two = {f"i{n}": {"r1": a, "r2": b} for n, (a, b) in enumerate(_table(3, 0, 1, 3))}
    two["alone"] = {"r1": "y"}  # rated once: says nothing about agreement
    assert kappa(two) == ("cohen", Fraction(18, 25), 7)
    three = {"i1": {"r1": "y", "r2": "y", "r3": "y"}, "i2": {"r1": "y", "r2": "y", "r3": "y"},
             "i3": {"r1": "n", "r2": "n", "r3": "n"}, "i4": {"r1": "y", "r2": "y", "r3": "n"}}
    assert kappa(three) == ("fleiss", Fraction(5, 8), 4)


def test_undefined_and_impossible_kappas():
    assert cohen_kappa([("y", "y")] * 3) is None  # chance agreement is certain
    assert fleiss_kappa([["y", "y"], ["y", "y"]]) is None
    with pytest.raises(KappaError):
        cohen_kappa([])
    with pytest.raises(KappaError, match="same number"):
        fleiss_kappa([["y", "y", "n"], ["y", "n"]])
    with pytest.raises(KappaError, match="fewer than two"):
        kappa({"i": {"r1": "y"}})
