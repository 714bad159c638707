"""Tests of barlowtwins.evaluation.results: the one shape of accuracies, and older ones read."""

from __future__ import annotations

import json

import pytest

from barlowtwins.evaluation.results import (
    STANDARD_KNN,
    TRAINED,
    Accuracies,
    KnnProtocol,
    knn_protocols,
)


def _accuracies() -> Accuracies:
    return Accuracies(
        train_images=600,
        test_images=100,
        knn_k=50,
        knn_temperature=0.1,
        knn={
            "k=20 T=0.07": {TRAINED: 81.0, "raw pixels": 70.0},
            "k=50 T=0.1": {TRAINED: 80.5, "raw pixels": 71.0},
            "k=200 T=0.1": {TRAINED: 79.25, "raw pixels": 69.5},
        },
        linear_probe={TRAINED: 83.0},
        linear_probe_epochs=5,
    )


def test_the_standard_protocols_are_the_literatures_two() -> None:
    assert [(p.k, p.temperature) for p in STANDARD_KNN] == [(20, 0.07), (200, 0.1)]


def test_a_runs_own_protocol_is_added_once_in_order() -> None:
    assert knn_protocols(200, 0.1) == STANDARD_KNN
    assert [p.label for p in knn_protocols(50, 0.1)] == ["k=20 T=0.07", "k=50 T=0.1", "k=200 T=0.1"]


def test_a_protocol_label_reads_back() -> None:
    for protocol in knn_protocols(5, 0.05):
        assert KnnProtocol.from_label(protocol.label) == protocol
    with pytest.raises(ValueError, match="not a kNN protocol"):
        KnnProtocol.from_label("200")


def test_the_shape_survives_json() -> None:
    accuracies = _accuracies()
    values = json.loads(json.dumps(accuracies.to_dict()))
    assert values["knn"]["protocols"]["k=20 T=0.07"] == {
        "k": 20,
        "temperature": 0.07,
        "top1": {TRAINED: 81.0, "raw pixels": 70.0},
    }
    assert Accuracies.from_dict(values) == accuracies
    assert accuracies.own_knn == {TRAINED: 80.5, "raw pixels": 71.0}


def test_the_table_has_a_column_per_protocol() -> None:
    lines = _accuracies().table().splitlines()
    assert lines[1].split() == ["k=20", "T=0.07", "k=50", "T=0.1", "k=200", "T=0.1"]
    assert lines[2].split() == ["barlow", "twins", "81.00%", "80.50%", "79.25%"]
    assert lines[3].split() == ["raw", "pixels", "70.00%", "71.00%", "69.50%"]
    assert lines[-1].split() == ["barlow", "twins", "83.00%"]


def test_results_of_the_previous_shape_are_read_at_their_one_temperature() -> None:
    # fit's results.json before the protocols: one temperature, scores keyed by k.
    values = {
        "train_images": 60000,
        "test_images": 10000,
        "knn": {
            "k": 200,
            "temperature": 0.1,
            "similarity": "cosine",
            "at_k": {"20": {TRAINED: 87.3}, "200": {TRAINED: 85.9}},
        },
    }
    accuracies = Accuracies.from_dict(values)
    assert accuracies is not None
    assert [p.label for p in accuracies.protocols] == ["k=20 T=0.1", "k=200 T=0.1"]
    assert accuracies.own_knn == {TRAINED: 85.9}


def test_evaluates_first_flat_keys_are_read() -> None:
    values = {"train images": 600, "knn top-1 % (k=200)": 80.0, "linear probe top-1 %": 82.0}
    accuracies = Accuracies.from_dict(values)
    assert accuracies is not None
    assert accuracies.knn == {"k=200 T=0.1": {TRAINED: 80.0}}
    assert accuracies.linear_probe == {TRAINED: 82.0}
    assert Accuracies.from_dict({"loss": 1.0}) is None
