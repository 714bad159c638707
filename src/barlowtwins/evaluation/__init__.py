"""Evaluation of frozen features: extraction, weighted kNN, linear probe, and the plots of a
run (:mod:`.plots`, imported on demand: it needs matplotlib)."""

from barlowtwins.evaluation.probes import (
    LinearProbeResult,
    bank_device,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    raw_pixel_features,
)

__all__ = [
    "LinearProbeResult",
    "bank_device",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "raw_pixel_features",
]
