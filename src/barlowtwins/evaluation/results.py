"""The one shape of measured accuracies: what ``fit`` writes into ``results.json``, what
``evaluate`` prints, writes with ``--json`` and keeps in ``evaluation.json``, and what the
model card reads.

::

    {
      "train_images": 60000, "test_images": 10000,
      "knn": {"k": 200, "temperature": 0.1, "similarity": "cosine",
              "at_k": {"20": {"barlow twins": 87.3, ...}, "200": {...}}},
      "linear_probe": {"epochs": 100, "top1": {"barlow twins": 87.4}}
    }

Accuracies are top-1 percentages, keyed by the encoder they score: ``"barlow twins"`` for the
trained one and, where ``fit`` measures them, ``"random init"`` and ``"raw pixels"``.
Results written before this shape existed are read too (:meth:`Accuracies.from_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The key of the trained encoder's accuracies.
TRAINED = "barlow twins"
# evaluate's keys before this shape: "knn top-1 % (k=200)", "linear probe top-1 %".
_OLD_KNN = re.compile(r"^knn top-1 % \(k=(\d+)\)$")
_OLD_PROBE = "linear probe top-1 %"


@dataclass(frozen=True)
class Accuracies:
    """Test accuracies of encoders: weighted kNN at one or more ``k`` and a linear probe.

    Attributes:
        train_images: Labelled images the kNN bank and the probe were fitted on.
        test_images: Images they were scored on.
        knn_k: The run's own ``k`` (the kNN monitor's and ``--knn-k``).
        knn_temperature: Temperature of the kNN votes.
        knn: ``{str(k): {encoder: accuracy %}}``.
        linear_probe: ``{encoder: accuracy %}``; empty when no probe ran.
        linear_probe_epochs: Epochs of that probe.
    """

    train_images: int
    test_images: int
    knn_k: int
    knn_temperature: float
    knn: Mapping[str, Mapping[str, float]]
    linear_probe: Mapping[str, float] = field(default_factory=dict)
    linear_probe_epochs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The shape of the module docstring (JSON-ready)."""
        result: dict[str, Any] = {
            "train_images": self.train_images,
            "test_images": self.test_images,
            "knn": {
                "k": self.knn_k,
                "temperature": self.knn_temperature,
                "similarity": "cosine",
                "at_k": {k: dict(scores) for k, scores in self.knn.items()},
            },
        }
        if self.linear_probe:
            result["linear_probe"] = {
                "epochs": self.linear_probe_epochs,
                "top1": dict(self.linear_probe),
            }
        return result

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Accuracies | None:
        """Read :meth:`to_dict`'s shape, or the results of a run from before it; None when
        ``values`` holds no accuracy."""
        knn = values.get("knn")
        if isinstance(knn, Mapping) and "at_k" in knn:
            probe = values.get("linear_probe") or {}
            return cls(
                train_images=int(values.get("train_images", 0)),
                # Before this shape, fit kept the test count inside "knn".
                test_images=int(values.get("test_images", knn.get("test_images", 0))),
                knn_k=int(knn.get("k", min(int(k) for k in knn["at_k"]))),
                knn_temperature=float(knn["temperature"]),
                knn={str(k): dict(scores) for k, scores in knn["at_k"].items()},
                linear_probe=dict(probe.get("top1", {})),
                linear_probe_epochs=probe.get("epochs"),
            )
        old_knn = {
            match.group(1): {TRAINED: float(value)}
            for key, value in values.items()
            if (match := _OLD_KNN.match(key))
        }
        if not old_knn and _OLD_PROBE not in values:
            return None
        return cls(
            train_images=int(values.get("train images", 0)),
            test_images=int(values.get("test images", 0)),
            knn_k=int(next(iter(old_knn), 0)),
            # evaluate's only temperature before it was recorded.
            knn_temperature=0.1,
            knn=old_knn,
            linear_probe={TRAINED: float(values[_OLD_PROBE])} if _OLD_PROBE in values else {},
        )

    def table(self) -> str:
        """The accuracies as ``fit`` and ``evaluate`` print them."""
        lines = []
        if self.knn:
            columns = sorted(self.knn, key=int)
            lines += [
                f"Test kNN accuracy on {self.test_images} images (cosine similarity, "
                f"temperature {self.knn_temperature}, all {self.train_images} training images "
                "vote):",
                " " * 15 + "".join(f"{'k=' + k:>9}" for k in columns),
            ]
            for name in self.knn[columns[0]]:
                row = "".join(f"{self.knn[k][name]:8.2f}%" for k in columns)
                lines.append(f"  {name:<13}{row}")
        if self.linear_probe:
            lines.append(
                f"Linear probe ({self.linear_probe_epochs} epochs on the frozen features of the "
                f"{self.train_images} training images):"
            )
            lines += [f"  {name:<22}{value:8.2f}%" for name, value in self.linear_probe.items()]
        return "\n".join(lines)


__all__ = ["TRAINED", "Accuracies"]
