"""lab/tools/plot_metrics.py (gn_det_lab.curves), run in-process on synthetic metrics.json files."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gn_det_lab.curves import main as plot_main
from gn_det_lab.curves import read_metrics


def _tool(name):
    assert name == "plot_metrics"
    return plot_main


@pytest.fixture
def curve_logs(caplog):
    caplog.set_level(logging.WARNING, logger="gn_det_lab")
    return caplog


# ---------------------------------------------------------------------------------------------
# plot_metrics
# ---------------------------------------------------------------------------------------------

LOSSES = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


def _train_record(iteration, losses=LOSSES, scale=1.0):
    record = {
        "iteration": iteration,
        "lr": 0.02 * min(1.0, (iteration + 1) / 40),
        "time": 0.5,
        "data_time": 0.01,
        "fast_rcnn/cls_accuracy": 0.9,
    }
    for i, key in enumerate(losses):
        record[key] = scale * (i + 1) / (iteration + 10)
    record["total_loss"] = sum(record[k] for k in losses)
    return record


def _write_run(folder: Path, lines) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("".join(line + "\n" for line in lines))
    return folder


@pytest.fixture
def runs(tmp_path):
    """Three runs as detectron2 leaves them: finished (two evaluations); no masks and no
    evaluation; crashed (a NaN loss, a line cut off mid-write, no newline at the end)."""
    finished = _write_run(
        tmp_path / "finished",
        [
            *(json.dumps(_train_record(i)) for i in range(19, 200, 20)),
            json.dumps({"iteration": 100, "bbox/AP": 10.5, "segm/AP": 9.25, "bbox/AP50": 20.0}),
            json.dumps({"iteration": 200, "bbox/AP": 15.0, "segm/AP": 14.0, "bbox/AP50": 30.0}),
        ],
    )
    boxes_only = _write_run(
        tmp_path / "boxes_only",
        [
            json.dumps(_train_record(i, losses=[k for k in LOSSES if k != "loss_mask"]))
            for i in range(19, 120, 20)
        ],
    )
    nan_record = dict(_train_record(59, scale=2.0), loss_mask=float("nan"))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "metrics.json").write_text(
        json.dumps(_train_record(19, scale=2.0))
        + "\n"
        + json.dumps(_train_record(39, scale=2.0))
        + "\n"
        + json.dumps(nan_record)
        + "\n"  # json.dumps writes NaN, as detectron2 does
        + json.dumps(_train_record(79, scale=2.0))[:57]  # killed mid-write
    )
    return {"finished": finished, "boxes_only": boxes_only, "crashed": crashed}


def test_read_metrics_skips_bad_lines_and_nan(runs, curve_logs):
    crashed = read_metrics(runs["crashed"])
    assert crashed.label == "crashed"
    assert crashed.skipped_lines == 1
    assert "line 4" in curve_logs.text and "truncated" in curve_logs.text
    assert crashed.series["total_loss"][0] == [19, 39, 59]
    assert crashed.series["loss_mask"] == ([19, 39], [2.0 * 3 / 29, 2.0 * 3 / 49])  # NaN left out
    assert "bbox/AP" not in crashed.series

    finished = read_metrics(runs["finished"] / "metrics.json", label="GN")
    assert finished.label == "GN"
    assert finished.series["bbox/AP"] == ([100, 200], [10.5, 15.0])
    assert finished.series["segm/AP"] == ([100, 200], [9.25, 14.0])
    assert finished.series["lr"][1][-1] == pytest.approx(0.02)

    assert "loss_mask" not in read_metrics(runs["boxes_only"]).series


def test_read_metrics_resumed_run_keeps_the_later_value(tmp_path):
    run = _write_run(
        tmp_path / "resumed",
        [
            json.dumps({"iteration": 19, "total_loss": 3.0}),
            json.dumps({"iteration": 39, "total_loss": 2.0}),
            json.dumps({"iteration": 39, "total_loss": 2.5}),  # resumed from iteration 20
            "[1, 2]",  # valid JSON, not a record
            "",
            json.dumps({"total_loss": 1.0}),  # no iteration: not plottable
        ],
    )
    metrics = read_metrics(run)
    assert metrics.series == {"total_loss": ([19, 39], [3.0, 2.5])}
    assert metrics.skipped_lines == 1


def test_plot_metrics_writes_one_png_of_the_stated_size(runs, tmp_path, curve_logs, capsys):
    main = _tool("plot_metrics")
    output = tmp_path / "plots" / "curves.png"
    output.parent.mkdir()
    argv = [
        str(runs["finished"]),
        str(runs["boxes_only"]),
        str(runs["crashed"]),
        "--labels",
        "GN",
        "BN",
        "crashed",
        "--output",
        str(output),
    ]
    assert main(argv) == 0
    # total_loss, 5 loss terms, lr, bbox/AP, segm/AP: 9 panels of 4x3 in, 3 to a row, 100 dpi.
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (3 * 400, 3 * 300)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas
    assert "truncated" in curve_logs.text
    assert sorted(p.name for p in output.parent.iterdir()) == ["curves.png"]  # no temp file left

    # An existing output is kept unless --force.
    before = output.read_bytes()
    assert main(argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert output.read_bytes() == before
    assert main(argv[:3] + ["--output", str(output), "--force", "--dpi", "50"]) == 0
    with Image.open(output) as image:
        assert image.size == (3 * 200, 3 * 150)


def test_plot_metrics_panels_follow_the_keys_present(runs, tmp_path):
    # No masks, no evaluation: total_loss, 4 loss terms, lr = 6 panels, 2 rows.
    output = tmp_path / "boxes_only.png"
    assert _tool("plot_metrics")([str(runs["boxes_only"]), "--output", str(output)]) == 0
    with Image.open(output) as image:
        assert image.size == (1200, 600)


def test_plot_metrics_has_a_panel_per_test_dataset(tmp_path):
    from gn_det_lab.curves import _panels

    # Two test datasets: detectron2 prefixes each result with the dataset's name.
    run = _write_run(
        tmp_path / "two_splits",
        [
            json.dumps({"iteration": 9, "total_loss": 2.0}),
            json.dumps(
                {
                    "iteration": 9,
                    "shapes_val/bbox/AP": 30.0,
                    "shapes_val/segm/AP": 29.0,
                    "shapes_test/bbox/AP": 35.0,
                    "shapes_test/segm/AP": 33.0,
                }
            ),
        ],
    )
    # The AP panels first: what a reader looks for.
    assert [key for key, _ in _panels([read_metrics(run)])] == [
        "shapes_test/bbox/AP",
        "shapes_val/bbox/AP",
        "shapes_test/segm/AP",
        "shapes_val/segm/AP",
        "total_loss",
    ]
    assert [key for key, _ in _panels([read_metrics(run)], "ap")] == [
        "shapes_test/bbox/AP",
        "shapes_val/bbox/AP",
        "shapes_test/segm/AP",
        "shapes_val/segm/AP",
    ]
    assert [key for key, _ in _panels([read_metrics(run)], "losses")] == ["total_loss"]
    output = tmp_path / "two_splits.png"
    assert _tool("plot_metrics")([str(run), "--output", str(output)]) == 0
    with Image.open(output) as image:
        assert image.size == (1200, 600)  # 5 panels, 3 to a row


def test_plot_metrics_bad_input(runs, tmp_path, capsys):
    main = _tool("plot_metrics")
    assert main([str(tmp_path / "no_run"), "--output", str(tmp_path / "x.png")]) == 2
    assert "metrics.json: no such file" in capsys.readouterr().err
    empty = _write_run(tmp_path / "empty", ['{"iteration": 1'])
    assert main([str(empty), "--output", str(tmp_path / "x.png")]) == 2
    assert "no run has training or evaluation values to plot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(runs["finished"]), "--labels", "a", "b", "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()



def test_plot_metrics_ap_alone(tmp_path):
    run = _write_run(
        tmp_path / "run",
        [
            json.dumps({"iteration": 9, "total_loss": 2.0, "lr": 0.1}),
            json.dumps({"iteration": 9, "bbox/AP": 30.0, "segm/AP": 29.0}),
        ],
    )
    output = tmp_path / "ap.png"
    assert _tool("plot_metrics")([str(run), "--output", str(output), "--panels", "ap"]) == 0
    with Image.open(output) as image:
        assert image.size == (800, 300)  # 2 panels
