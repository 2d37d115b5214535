"""The README's figure (lab/images/small_batch.png) shows what the README's table quotes."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_small_batch_figure_plots_the_seed_the_table_quotes():
    spec = importlib.util.spec_from_file_location(
        "render_results", ROOT / "lab" / "tools" / "render_results.py"
    )
    render_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_results)
    from matplotlib.figure import Figure

    def axes_figure(rows, columns, size):
        figure = Figure(figsize=size, layout="constrained")
        return figure, list(figure.subplots(rows, columns, squeeze=False).ravel())

    figure = render_results._figure_small_batch(axes_figure)
    box, mask = figure.axes
    lines = {line.get_label(): line for line in box.get_lines()}
    # The README's table: BN at 1 image 71.1 / 68.6 (seed 1), GN 79.0 / 81.6; BN seed 2: 68.8.
    table = render_results.render("readme_results")
    assert "| 79.0 / 81.6 | 71.1 / 68.6 |" in table
    assert list(lines["BN"].get_xdata())[0] == 1 and lines["BN"].get_ydata()[0] == 71.1
    assert lines["GN"].get_ydata()[0] == 79.0
    assert list(lines["BN, seed 2"].get_ydata()) == [68.8]
    mask_lines = {line.get_label(): line for line in mask.get_lines()}
    assert mask_lines["BN"].get_ydata()[0] == 68.6
    assert lines["BN"].get_color() == mask_lines["BN"].get_color()
    assert "lab/images/small_batch.png" in render_results.FIGURES
