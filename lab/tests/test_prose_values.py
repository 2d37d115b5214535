"""Numbers quoted in prose are rendered from, and checked against, their results files
(gn_det_lab.prose, through lab/tools/render_results.py)."""

from pathlib import Path

import pytest

from gn_det_lab.prose import VALUE, render_values, stale_values, value_at

ROOT = Path(__file__).resolve().parents[2]

RESULT = {
    "rows": [["GN", "75.3 [74.2, 76.4]", "1,800"]],
    "data": {"difference": {"box": {"difference": -0.4321, "low": 0.25}}, "seeds": [1, 2]},
}


def test_a_value_is_found_by_its_path_and_formatted():
    assert value_at(RESULT, "data.difference.box.difference", "+.1f") == "−0.4"  # typographic minus
    assert value_at(RESULT, "data.difference.box.low", ".2f") == "0.25"
    assert value_at(RESULT, "data.seeds.1") == "2"
    assert value_at(RESULT, "rows.0.1") == "75.3 [74.2, 76.4]"
    assert value_at(RESULT, "rows.0.1#2") == "76.4"
    assert value_at(RESULT, "rows.0.1#0", ".0f") == "75"
    assert value_at(RESULT, "rows.0.2#0") == "1,800"
    for bad in ("data.difference.mask", "rows.3.1", "rows.0.1#3", "data.seeds.x"):
        with pytest.raises(KeyError):
            value_at(RESULT, bad)


def test_a_stale_value_is_named_and_rendering_fixes_it():
    text = (
        "ahead by <!-- value: r data.difference.box.difference +.1f -->+0.5<!-- /value --> box "
        "AP, seed <!-- value: r data.seeds.0 -->1<!-- /value -->."
    )
    load = {"r": RESULT}.__getitem__
    assert stale_values(text, load) == ['r data.difference.box.difference: "+0.5" != "−0.4"']
    fixed = render_values(text, load)
    assert stale_values(fixed, load) == []
    assert fixed == text.replace("+0.5", "−0.4")


def test_the_readme_quotes_its_study_numbers_through_markers():
    """The README's prose numbers of the demo's seed spread and the backbone answer are marked
    (so render_results.py --check, in test_render_results, catches them going stale)."""
    marked = {(m.group(1), m.group(2)) for m in VALUE.finditer((ROOT / "README.md").read_text())}
    names = {name for name, _ in marked}
    assert {"demo_seeds", "backbone_paired"} <= names, marked
    for kind in ("box", "mask"):  # the backbone answer quotes its paired interval, whole
        for end in ("difference", "low", "high"):
            assert ("backbone_paired", f"data.difference.{kind}.{end}") in marked
