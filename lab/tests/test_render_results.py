"""The results tables of README.md, docs/ and lab/ are what lab/results/ renders
(lab/tools/render_results.py): a stale number fails here."""

import importlib.util
import json
from pathlib import Path

import pytest

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


def test_norm_costs_gives_each_variant_one_colour_in_both_panels(tmp_path):
    """norm_costs.png, drawn from the committed results files: a variant's time bars and its
    memory bar share one colour, the time panel has error bars and holds all of them."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    render_results = _render_results()

    def axes_figure(rows, columns, size):
        figure = Figure(figsize=size, layout="constrained")
        return figure, list(figure.subplots(rows, columns, squeeze=False).ravel())

    figure = render_results._figure_norm_costs(axes_figure)
    figure.savefig(tmp_path / "norm_costs.png", dpi=50)
    assert (tmp_path / "norm_costs.png").stat().st_size > 0
    time_ax, memory_ax = figure.axes
    bars = [c for c in time_ax.containers if type(c).__name__ == "BarContainer"]
    time_colours = {c.get_label(): {to_hex(bar.get_facecolor()) for bar in c} for c in bars}
    assert set(time_colours) == {"frozenbn_4conv1fc", "gn", "gn_native"}
    names = [render_results._norm_cost_variant(t.get_text()) for t in memory_ax.get_yticklabels()]
    memory_colours = {
        name: to_hex(bar.get_facecolor()) for name, bar in zip(names, memory_ax.patches)
    }
    assert len(set(memory_colours.values())) == len(memory_colours) == 6
    for variant, colours in time_colours.items():
        assert colours == {memory_colours[variant]}, variant
    low, high = time_ax.get_ylim()
    errorbars = [c for c in time_ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(errorbars) == 1
    for segment in errorbars[0].lines[2][0].get_segments():
        assert low < segment[:, 1].min() and segment[:, 1].max() < high
    for container in bars:
        for bar in container:
            assert low < bar.get_y() + bar.get_height() < high


def _unexplained(results: Path) -> list:
    """``NAME: what is missing`` for each results file in ``results`` without a command, or with
    neither data nor a note (``raw_data``) saying why it has none."""
    found = []
    for path in sorted(results.glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        command, note = result.get("command"), result.get("raw_data")
        if not isinstance(command, str) or not command.strip():
            found.append(f"{path.stem}: no command")
        if not result.get("data") and not (isinstance(note, str) and note.strip()):
            found.append(f"{path.stem}: neither data nor a raw_data note")
    return found


def test_every_results_file_has_its_command_and_its_data_or_a_note():
    """A table without the command that made it cannot be checked or redone, and one without
    its raw data says so (``raw_data``) rather than leaving it unsaid."""
    assert _unexplained(ROOT / "lab" / "results") == []


def test_a_results_file_without_command_or_data_is_caught(tmp_path):
    table = {"title": "t", "machine": "m", "columns": ["a"], "rows": [["1"]]}
    files = {
        "fine": {**table, "command": "make t", "data": [1]},
        "noted": {**table, "command": "make t", "raw_data": "not kept"},
        "blank": {**table, "command": " ", "data": {"a": 1}},
        "missing": {**table, "data": [1]},
        "unnoted": {**table, "command": "make t", "data": {}, "raw_data": ""},
        "bare": {**table, "command": "make t", "data": None},
    }
    for name, result in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    assert _unexplained(tmp_path) == [
        "bare: neither data nor a raw_data note",
        "blank: no command",
        "missing: no command",
        "unnoted: neither data nor a raw_data note",
    ]


def test_write_results_refuses_an_empty_command(tmp_path):
    from gn_det_lab.results import write_results

    table = dict(title="t", machine="m", columns=["a"], rows=[["1"]], data=[1])
    path = tmp_path / "t.json"
    for command in ("", "  \n", None):
        with pytest.raises(ValueError, match="command"):
            write_results(path, command=command, **table)
        assert not path.exists()
    write_results(path, command="make t", **table)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text)["command"] == "make t"
    assert text == json.dumps(json.loads(text), indent=1, ensure_ascii=False) + "\n"
