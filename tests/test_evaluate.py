"""spark.evaluate: the k-NN scorer on features with a known answer, the tasks' data, and the command on a
run folder whose exported encoder is timm's random init (so pretrained and random must score the same)."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch

from spark import checkpoint as ckpt_io
from spark import evaluate


def test_knn_accuracy_on_separable_and_mixed_features():
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 10
    labels = torch.arange(3).repeat_interleave(5)
    features = centers[labels] + torch.randn(15, 16)
    assert evaluate.knn_accuracy(features, labels, None, None, k=3) == 1.0          # leave-one-out
    queries = centers + 0.1 * torch.randn(3, 16)
    assert evaluate.knn_accuracy(features, labels, queries, torch.arange(3), k=5) == 1.0
    assert evaluate.knn_accuracy(features, labels, queries, torch.tensor([1, 2, 0]), k=5) == 0.0
    # Leave-one-out leaves the query itself out: 1-NN of a point with a single copy per class fails.
    singles = torch.eye(4)
    assert evaluate.knn_accuracy(torch.cat([singles, singles]), torch.arange(8), None, None, k=1) == 0.0


def test_tasks_ship_offline_with_the_expected_shapes():
    faces, face_labels = evaluate.faces_task(32)
    assert faces.shape == (200, 3, 32, 32) and face_labels.sum() == 100
    reference, reference_labels, queries, query_labels = evaluate.photo_crops_task(32, seed=0)
    photographs = int(reference_labels.max()) + 1
    assert photographs >= 8 and reference.shape == queries.shape == (photographs * evaluate.CROPS_PER_HALF, 3, 32, 32)
    assert torch.equal(reference_labels, query_labels)
    again = evaluate.photo_crops_task(32, seed=0)
    assert torch.equal(again[2], queries)                                              # deterministic crops


def fake_run(folder, seed: int) -> str:
    """A run folder with a checkpoint's options and an exported resnet18 encoder of timm's init at `seed`."""
    os.makedirs(folder, exist_ok=True)
    ckpt_io.atomic_torch_save({"format": ckpt_io.FORMAT, "args": {"model": "resnet18", "input_size": 32}},
                              os.path.join(folder, ckpt_io.CHECKPOINT_NAME))
    torch.manual_seed(seed)
    encoder = timm.create_model("resnet18", features_only=True, pretrained=False)
    ckpt_io.export_encoder(encoder.state_dict(), "resnet18", str(folder))
    return str(folder)


def test_command_scores_the_exported_encoder_against_random_weights(tmp_path, capsys):
    run = fake_run(tmp_path / "run", seed=0)  # the exported encoder IS the random baseline
    assert evaluate.main([run, "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "faces vs non-faces" in out and "photo crops (proxy)" in out
    result = json.load(open(os.path.join(run, evaluate.RESULT_NAME)))
    for task in result["tasks"].values():
        assert task["pretrained"] == task["random"] and 0 <= task["random"] <= 1
    assert result["tasks"]["faces"]["random"] > 0.6   # timm's random resnet18 already separates faces a bit


def test_command_refuses_folders_that_are_not_finished_runs(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert evaluate.main([str(tmp_path / "empty")]) == 2
    assert "no checkpoint.pth" in capsys.readouterr().err
    run = fake_run(tmp_path / "broken", seed=0)
    with open(os.path.join(run, "encoder_features.pth"), "wb") as f:
        f.write(b"not a state dict")
    assert evaluate.main([run]) == 2
    assert "not loadable into timm's resnet18" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([run, "--k", "x"])
