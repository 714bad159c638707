"""The files of one ``fit`` run, by name: the one place that knows them.

``fit`` writes a run folder, ``evaluate --save-head`` adds to it, and ``embed``, ``evaluate``,
``export``, the model card and a resumed ``fit`` read it; all of them ask a :class:`RunFolder`
for the path of a file instead of spelling its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    """The output folder of ``barlowtwins fit`` and the paths of its files.

    Attributes:
        path: The folder (``fit --output``).
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunFolder | None:
        """The run a Lightning checkpoint belongs to, when it lies in a run's checkpoint folder."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint.parent.parent) if checkpoint.parent.name == _CHECKPOINTS else None

    @property
    def config(self) -> Path:
        """``config.yaml``: every option of the run, as ``fit --print-config`` shows them."""
        return self.path / "config.yaml"

    @property
    def results(self) -> Path:
        """``results.json``: what the run measured (kNN scores, hardware, minutes)."""
        return self.path / "results.json"

    @property
    def metrics(self) -> Path:
        """``metrics.csv``: every logged value of every invocation, merged."""
        return self.path / "metrics.csv"

    @property
    def logs(self) -> Path:
        """``logs/``: one CSV log folder per invocation (``run-000``, ``run-001``, ...)."""
        return self.path / "logs"

    @property
    def tensorboard(self) -> Path:
        """``tensorboard/``: the same values for TensorBoard, when it is installed."""
        return self.path / "tensorboard"

    @property
    def plots(self) -> Path:
        """``plots/``: the run's PNG figures."""
        return self.path / "plots"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: the Lightning checkpoints."""
        return self.path / _CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        """``checkpoints/last.ckpt``: the state after the last epoch (what a rerun resumes)."""
        return self.checkpoints / "last.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        """``checkpoints/best.ckpt``: the epoch with the best kNN monitor."""
        return self.checkpoints / "best.ckpt"

    @property
    def encoder_weights(self) -> Path:
        """``backbone.pt``: the trained encoder's ``state_dict`` with its library's keys."""
        return self.path / "backbone.pt"

    @property
    def encoder_info(self) -> Path:
        """``backbone.json``: how to rebuild and feed that encoder."""
        return self.path / "backbone.json"

    @property
    def linear_head(self) -> Path:
        """``linear_head.safetensors``: the classifier of ``evaluate --linear --save-head``."""
        return self.path / "linear_head.safetensors"

    @property
    def lock(self) -> Path:
        """``.lock``: held by the one ``fit`` process that writes the run (its pid inside)."""
        return self.path / ".lock"

    @property
    def evaluation(self) -> Path:
        """``evaluation.json``: the evaluation that head came from, with its protocol."""
        return self.path / "evaluation.json"

    @property
    def finetuned(self) -> Path:
        """``finetuned.safetensors``: the classifier of ``finetune`` (backbone and head trained
        together), in the layout of ``export --format safetensors --with-head``."""
        return self.path / "finetuned.safetensors"

    @property
    def finetune_results(self) -> Path:
        """``finetune.json``: what ``finetune`` measured, with its protocol."""
        return self.path / "finetune.json"

    @property
    def finetune_labels(self) -> Path:
        """``finetune_labels.csv``: the labelled subset ``finetune`` trained on, one image a
        line (index, label, class, path); ``finetune --subset`` reads it back."""
        return self.path / "finetune_labels.csv"

    @property
    def neighbours(self) -> Path:
        """``neighbours/``: what ``barlowtwins neighbours`` writes by default."""
        return self.path / "neighbours"


_CHECKPOINTS = "checkpoints"

__all__ = ["RunFolder"]
