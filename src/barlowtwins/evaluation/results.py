"""The one shape of measured accuracies: what ``fit`` writes into ``results.json``, what
``evaluate`` prints, writes with ``--json`` and keeps in ``evaluation.json``, and what the
model card reads.

::

    {
      "train_images": 60000, "test_images": 10000,
      "knn": {"k": 200, "temperature": 0.1, "similarity": "cosine",
              "protocols": {"k=20 T=0.07": {"k": 20, "temperature": 0.07,
                                            "top1": {"barlow twins": 87.3, ...}},
                            "k=200 T=0.1": {...}}},
      "linear_probe": {"epochs": 100, "top1": {"barlow twins": 87.4}}
    }

Accuracies are top-1 percentages, keyed by the encoder they score: ``"barlow twins"`` for the
trained one and, where ``fit`` measures them, ``"random init"`` and ``"raw pixels"``. Every
kNN accuracy is reported under both common protocols (:data:`STANDARD_KNN`), so a number
compares with the papers' of either family; ``k`` and ``temperature`` at the top are the run's
own (its ``--knn-k`` and the monitor's temperature). Results written before this shape
existed are read too (:meth:`Accuracies.from_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The key of the trained encoder's accuracies.
TRAINED = "barlow twins"
# evaluate's keys before this shape: "knn top-1 % (k=200)", "linear probe top-1 %".
_OLD_KNN = re.compile(r"^knn top-1 % \(k=(\d+)\)$")
_OLD_PROBE = "linear probe top-1 %"
_LABEL = re.compile(r"^k=(\d+) T=([0-9.eE+-]+)$")


@dataclass(frozen=True, order=True)
class KnnProtocol:
    """A weighted kNN protocol: ``k`` neighbours vote with weight ``exp(cos / temperature)``."""

    k: int
    temperature: float

    @property
    def label(self) -> str:
        """``"k=20 T=0.07"``: the protocol's key in results and its column in tables."""
        return f"k={self.k} T={self.temperature:g}"

    @classmethod
    def from_label(cls, label: str) -> KnnProtocol:
        """The protocol of :attr:`label`."""
        match = _LABEL.match(label)
        if match is None:
            raise ValueError(f"not a kNN protocol label: {label!r}")
        return cls(int(match.group(1)), float(match.group(2)))


#: The self-supervised literature's two protocols, k=20, T=0.07 (solo-learn's and DINO's,
#: Caron et al. 2021, arXiv 2104.14294) and k=200, T=0.1 (InstDisc's, Wu et al. 2018,
#: arXiv 1805.01978, which lightly's benchmarks use).
STANDARD_KNN = (KnnProtocol(20, 0.07), KnnProtocol(200, 0.1))


def knn_protocols(k: int, temperature: float) -> tuple[KnnProtocol, ...]:
    """The standard protocols and a run's own (``k``, ``temperature``), sorted, without
    repeats."""
    return tuple(sorted({*STANDARD_KNN, KnnProtocol(k, temperature)}))


@dataclass(frozen=True)
class Accuracies:
    """Test accuracies of encoders: weighted kNN under one or more protocols and a linear
    probe.

    Attributes:
        train_images: Labelled images the kNN bank and the probe were fitted on.
        test_images: Images they were scored on.
        knn_k: The run's own ``k`` (the kNN monitor's and ``--knn-k``).
        knn_temperature: The run's own temperature.
        knn: ``{protocol label: {encoder: accuracy %}}`` (:attr:`KnnProtocol.label`).
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

    @property
    def protocols(self) -> list[KnnProtocol]:
        """The kNN protocols measured, by ``k`` then temperature."""
        return sorted(KnnProtocol.from_label(label) for label in self.knn)

    @property
    def own_knn(self) -> Mapping[str, float]:
        """The accuracies under the run's own protocol (empty if it was not measured)."""
        return self.knn.get(KnnProtocol(self.knn_k, self.knn_temperature).label, {})

    @property
    def encoders(self) -> list[str]:
        """The encoders scored, in the order they were."""
        names: dict[str, None] = {}
        for scores in (*self.knn.values(), self.linear_probe):
            names.update(dict.fromkeys(scores))
        return list(names)

    def to_dict(self) -> dict[str, Any]:
        """The shape of the module docstring (JSON-ready)."""
        result: dict[str, Any] = {
            "train_images": self.train_images,
            "test_images": self.test_images,
            "knn": {
                "k": self.knn_k,
                "temperature": self.knn_temperature,
                "similarity": "cosine",
                "protocols": {
                    protocol.label: {
                        "k": protocol.k,
                        "temperature": protocol.temperature,
                        "top1": dict(self.knn[protocol.label]),
                    }
                    for protocol in self.protocols
                },
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
        if isinstance(knn, Mapping) and ("protocols" in knn or "at_k" in knn):
            probe = values.get("linear_probe") or {}
            temperature = float(knn["temperature"])
            if "protocols" in knn:
                scores = {
                    KnnProtocol(int(entry["k"]), float(entry["temperature"])).label: dict(
                        entry["top1"]
                    )
                    for entry in knn["protocols"].values()
                }
            else:  # one temperature for every k, keyed by k alone
                scores = _at_one_temperature(knn["at_k"].items(), temperature)
            return cls(
                train_images=int(values.get("train_images", 0)),
                # Before this shape, fit kept the test count inside "knn".
                test_images=int(values.get("test_images", knn.get("test_images", 0))),
                knn_k=int(knn.get("k", min(p.k for p in map(KnnProtocol.from_label, scores)))),
                knn_temperature=temperature,
                knn=scores,
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
        # evaluate's only temperature before it was recorded.
        return cls(
            train_images=int(values.get("train images", 0)),
            test_images=int(values.get("test images", 0)),
            knn_k=int(next(iter(old_knn), 0)),
            knn_temperature=0.1,
            knn=_at_one_temperature(old_knn.items(), 0.1),
            linear_probe={TRAINED: float(values[_OLD_PROBE])} if _OLD_PROBE in values else {},
        )

    def table(self) -> str:
        """The accuracies as ``fit`` and ``evaluate`` print them."""
        lines = []
        if self.knn:
            protocols = self.protocols
            lines += [
                f"Test kNN accuracy on {self.test_images} images (cosine similarity; all "
                f"{self.train_images} training images vote):",
                " " * 15 + "".join(f"{protocol.label:>14}" for protocol in protocols),
            ]
            for name in self.encoders:
                row = "".join(
                    f"{self.knn[p.label][name]:13.2f}%" if name in self.knn[p.label] else " " * 14
                    for p in protocols
                )
                if row.strip():
                    lines.append(f"  {name:<13}{row}")
        if self.linear_probe:
            lines.append(
                f"Linear probe ({self.linear_probe_epochs} epochs on the frozen features of the "
                f"{self.train_images} training images):"
            )
            lines += [f"  {name:<22}{value:8.2f}%" for name, value in self.linear_probe.items()]
        return "\n".join(lines)


def _at_one_temperature(
    at_k: Iterable[tuple[str, Mapping[str, float]]], temperature: float
) -> dict[str, dict[str, float]]:
    return {KnnProtocol(int(k), temperature).label: dict(scores) for k, scores in at_k}


__all__ = ["STANDARD_KNN", "TRAINED", "Accuracies", "KnnProtocol", "knn_protocols"]
