"""spark.plot: loss and lr curves from log.jsonl files, overlaid (spark-pretrain writes loss.png with it; the
run-level test is in test_pretrain.py)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from spark import plot


def write_log(folder, losses, torn_tail: bool = False) -> str:
    folder.mkdir()
    lines = [json.dumps({"step": k + 1, "loss": loss, "lr": 1e-3 * (k + 1)}) + "\n" for k, loss in enumerate(losses)]
    (folder / "log.jsonl").write_text("".join(lines) + ('{"step": 99, "lo' if torn_tail else ""))
    return str(folder)


def test_runs_are_overlaid_and_a_torn_last_line_is_ignored(tmp_path, capsys):
    first = write_log(tmp_path / "fp32", [1.0, 0.9, 0.8])
    second = write_log(tmp_path / "bf16", [0.95, 0.85, 0.7], torn_tail=True)  # as a killed run leaves it
    loss_axes, lr_axes = plot.loss_figure([first, second]).axes
    runs = {line.get_label(): line for line in loss_axes.lines}
    assert list(runs["fp32"].get_xdata()) == list(runs["bf16"].get_xdata()) == [1, 2, 3]
    np.testing.assert_allclose(runs["bf16"].get_ydata(), [0.95, 0.85, 0.7])
    assert "predict the patch mean" in runs and len(lr_axes.lines) == 2
    np.testing.assert_allclose(lr_axes.lines[0].get_ydata(), [1e-3, 2e-3, 3e-3])

    png = str(tmp_path / "cmp.png")
    assert plot.main([first, second, "--out", png, "--labels", "a", "b"]) == 0
    assert Image.open(png).format == "PNG"
    assert plot.main([first]) == 0 and Image.open(tmp_path / "fp32" / "loss.png").format == "PNG"


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "no log.jsonl" in capsys.readouterr().err
    run = write_log(tmp_path / "run", [1.0])
    assert plot.main([run, "--labels", "a", "b"]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
