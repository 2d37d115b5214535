"""The results tables of README.md, docs/ and lab/ are what lab/results/ renders
(lab/tools/render_results.py): a stale number fails here."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _render_results():
    spec = importlib.util.spec_from_file_location(
        "render_results", ROOT / "lab" / "tools" / "render_results.py"
    )
    render_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_results)
    return render_results


def test_the_results_tables_are_what_their_results_files_render():
    """README, docs/ and lab/ tables between <!-- results: NAME --> markers equal the rendering
    of lab/results/NAME.json, and every results file is shown by some table."""
    render_results = _render_results()
    assert render_results.stale() == []
    found = {
        path.relative_to(ROOT).as_posix(): {
            m.group(2) for m in render_results.BLOCK.finditer(path.read_text())
        }
        for path in render_results.documents()
    }
    assert "readme_results" in found["README.md"]  # the README's table renders from the lab's files
    assert {"small_batch_grid", "zero_shot_transfer", "norm_variants_memory"} <= found[
        "lab/benchmarks.md"
    ]
    names = set().union(*found.values())
    files = {p.stem for p in (ROOT / "lab" / "results").glob("*.json")}
    assert names <= files and not files - names, (
        f"results files no table shows: {sorted(files - names)}"
    )
    for name in files:  # each says how it was measured
        result = render_results.load(name)
        assert (
            result["title"] and "columns" in result and "machine" in result and "command" in result
        ), name


def test_a_stale_number_is_caught(tmp_path, monkeypatch):
    render_results = _render_results()
    results = tmp_path / "results"
    results.mkdir()
    (results / "t.json").write_text(
        json.dumps({"title": "t", "columns": ["a", "b"], "rows": [["x", "1.0"]]})
    )
    (results / "s.json").write_text(
        json.dumps(
            {
                "title": "s",
                "columns": ["quoted"],
                "rows": [[{"from": "t", "where": {"a": "x"}, "column": "b"}]],
            }
        )
    )
    doc = tmp_path / "README.md"
    doc.write_text("<!-- results: s -->\n| quoted |\n|---|\n| 1.0 |\n<!-- /results -->\n")
    monkeypatch.setattr(render_results, "RESULTS", results)
    monkeypatch.setattr(render_results, "documents", lambda: [doc])
    monkeypatch.setattr(render_results, "ROOT", tmp_path)
    assert render_results.stale() == []
    (results / "t.json").write_text(
        json.dumps({"title": "t", "columns": ["a", "b"], "rows": [["x", "1.1"]]})
    )
    assert render_results.stale() == ["README.md: s"]
    render_results.rewrite()
    assert "| 1.1 |" in doc.read_text() and render_results.stale() == []
