"""One loader for everything that holds a trained encoder.

``embed``, ``evaluate``, ``export`` and :func:`barlowtwins.load_pretrained` all read their
input here; it needs neither Lightning nor the application. What it reads:

* a ``fit`` output folder: ``backbone.pt`` (a ``state_dict`` with the source library's keys)
  and ``backbone.json`` (:class:`~barlowtwins.encoder.EncoderInfo`),
  ``checkpoints/last.ckpt`` (the Lightning checkpoint, which also holds the projector), and
  ``linear_head.safetensors`` when ``evaluate --linear --save-head`` ran on it;
* ``backbone.pt`` itself, or a Lightning ``.ckpt`` of :class:`BarlowTwinsModule`;
* what ``barlowtwins export`` writes: a ``.safetensors`` file (``--format safetensors`` or
  ``full``) or a Hugging Face folder (``config.json`` + ``model.safetensors``).

A run folder's file names are :class:`~barlowtwins.runs.folder.RunFolder`'s. Every pickle is
read with ``weights_only=True`` (:func:`~barlowtwins.runs.files.safe_load`); safetensors files
hold no code by construction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from barlowtwins.encoder import EncoderInfo, LinearHead, attach_head, classifier_name
from barlowtwins.hparams import checkpoint_values
from barlowtwins.runs.files import CheckpointError, atomic_write, safe_load
from barlowtwins.runs.folder import RunFolder

RUN_SOURCES = (
    "a fit output folder, its backbone.pt, a Lightning .ckpt, or a file or folder that "
    "`barlowtwins export` wrote"
)
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
# The Hugging Face folder's copy of the run's plots, which its model card shows.
HF_PLOTS = "plots"
# Written into the header of every safetensors file of ours, with what it holds.
FORMAT_KEY = "barlowtwins_format"
ENCODER_CONTENT, CLASSIFIER_CONTENT, FULL_CONTENT = "encoder", "classifier", "full"
# The header key of a classifier that `barlowtwins finetune` trained: its protocol, as JSON.
FINETUNED_KEY = "finetuned"
#: The linear head that ``evaluate --linear --save-head`` saves on the run's backbone.
LINEAR_HEAD = "linear"
#: The classifier that ``finetune`` trains, backbone and head together.
FINETUNED_HEAD = "finetuned"
_CHECKPOINT_PREFIX = "model."
# A run folder's files relative to it, for messages.
_IN_A_RUN = RunFolder(Path())


@dataclass(frozen=True)
class TrainedEncoder:
    """A trained encoder as found on disk, with whatever came with it.

    Attributes:
        source: The path it was loaded from.
        folder: The ``fit`` run it belongs to (its ``config.yaml``, ``results.json``,
            ``plots/``, ...), or ``None``.
        info: Architecture and pre-processing of the encoder.
        backbone_state: The encoder's ``state_dict`` (keys of its source library).
        projector_state: The projector's ``state_dict`` when asked for and available.
        projector_dims: The projector's sizes, when known.
        head: The linear head saved into the run or the export, if any.
        metadata: Extra header fields of an exported file (empty otherwise).
    """

    source: Path
    folder: RunFolder | None
    info: EncoderInfo
    backbone_state: dict[str, Tensor]
    projector_state: dict[str, Tensor] | None = None
    projector_dims: tuple[int, ...] | None = None
    head: LinearHead | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def encoder(self) -> nn.Module:
        """The backbone, weights loaded strictly, in eval mode."""
        from barlowtwins.backbones import build_backbone

        backbone, _ = build_backbone(
            self.info.backbone, in_channels=self.info.in_channels, small_image=self.info.small_image
        )
        try:
            backbone.load_state_dict(self.backbone_state)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise CheckpointError(
                f"{self.source} does not fit backbone {self.info.backbone}: {first}"
            ) from None
        return backbone.eval()

    def model(self) -> nn.Module:
        """The whole :class:`~barlowtwins.BarlowTwins` network (backbone and projector).

        Raises:
            CheckpointError: If the projector was not loaded (see :func:`load_trained_encoder`).
        """
        from barlowtwins.model import BarlowTwins

        if self.projector_state is None or self.projector_dims is None:
            raise CheckpointError(
                f"{self.source} holds no projector: pass the run folder or its "
                f"{_IN_A_RUN.last_checkpoint}"
            )
        model = BarlowTwins.from_name(
            self.info.backbone,
            in_channels=self.info.in_channels,
            small_image=self.info.small_image,
            projector_dims=self.projector_dims,
        )
        state = {f"backbone.{k}": v for k, v in self.backbone_state.items()}
        state |= {f"projector.{k}": v for k, v in self.projector_state.items()}
        model.load_state_dict(state)
        return model.eval()

    def matching_head(self) -> LinearHead:
        """The linear head, checked to belong to these backbone weights.

        Raises:
            CheckpointError: If there is none, or it was trained on other weights.
        """
        if self.head is None:
            where = self.folder.path if self.folder is not None else self.source
            raise CheckpointError(
                f"no linear head in {where}: run `barlowtwins evaluate RUN --linear "
                "--save-head` on the run folder first"
            )
        if self.head.backbone_sha256 != fingerprint(self.backbone_state):
            raise CheckpointError(
                f"the linear head of {self.folder.path if self.folder else self.source} was "
                "trained on other "
                "backbone weights; rerun `barlowtwins evaluate RUN --linear --save-head`"
            )
        return self.head


def fingerprint(state: dict[str, Tensor]) -> str:
    """SHA-256 of a ``state_dict``: names, dtypes, shapes and bytes of every tensor."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_trained_encoder(path: str | Path, *, projector: bool = False) -> TrainedEncoder:
    """Read a trained encoder from any of the places listed in the module docstring.

    Args:
        path: A ``fit`` output folder, ``backbone.pt``, a Lightning ``.ckpt``, an exported
            ``.safetensors`` file or an exported Hugging Face folder.
        projector: Also load the projector. From a run folder, backbone and projector then
            both come from ``checkpoints/last.ckpt``, so they belong to the same step.

    Returns:
        The :class:`TrainedEncoder`.

    Raises:
        CheckpointError: If ``path`` is missing, not one of these, corrupt or unsafe.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, projector)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        return _load_safetensors(path, RunFolder(path.parent), projector)
    content = safe_load(path)
    if _is_lightning_checkpoint(content):
        return _from_checkpoint(path, content, RunFolder.of_checkpoint(path))
    if projector:
        raise CheckpointError(
            f"{path} holds only the backbone: pass the run folder or its "
            f"{_IN_A_RUN.last_checkpoint} for the projector"
        )
    return _from_backbone_file(path, content)


def _load_folder(path: Path, projector: bool) -> TrainedEncoder:
    run = RunFolder(path)
    last, weights = run.last_checkpoint, run.encoder_weights
    if weights.is_file() and not projector:
        return _from_backbone_file(weights, safe_load(weights))
    if last.is_file():
        content = safe_load(last)
        if not _is_lightning_checkpoint(content):
            raise CheckpointError(f"{last} is not a Lightning checkpoint of BarlowTwinsModule")
        return _from_checkpoint(last, content, run)
    if weights.is_file():
        raise CheckpointError(
            f"{path} has no {_IN_A_RUN.last_checkpoint}: the projector is only kept in the "
            "Lightning checkpoint"
        )
    if (path / HF_WEIGHTS).is_file():
        return _load_safetensors(path / HF_WEIGHTS, None, projector)
    raise CheckpointError(
        f"{path} is not a run: it has no {_IN_A_RUN.encoder_weights}, "
        f"{_IN_A_RUN.last_checkpoint} or {HF_WEIGHTS}"
    )


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes) and then a JSON ``{``;
    a torch pickle starts with a zip or pickle magic number."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        start = handle.read(9)
    return len(start) == 9 and start[8:9] == b"{"


def _is_lightning_checkpoint(content: Any) -> bool:
    return isinstance(content, dict) and "state_dict" in content and "hyper_parameters" in content


def _from_checkpoint(
    path: Path, content: dict[str, Any], folder: RunFolder | None
) -> TrainedEncoder:
    hparams = content["hyper_parameters"]
    try:
        info = EncoderInfo.from_hparams(hparams)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a checkpoint of BarlowTwinsModule: {error}") from None
    states: dict[str, dict[str, Tensor]] = {"backbone": {}, "projector": {}}
    for key, value in content["state_dict"].items():
        part, _, name = key.removeprefix(_CHECKPOINT_PREFIX).partition(".")
        if key.startswith(_CHECKPOINT_PREFIX) and part in states:
            states[part][name] = value
    if not states["backbone"]:
        raise CheckpointError(f"{path} holds no backbone weights")
    return TrainedEncoder(
        source=path,
        folder=folder,
        info=info,
        backbone_state=states["backbone"],
        projector_state=states["projector"] or None,
        projector_dims=tuple(int(d) for d in checkpoint_values(hparams).get("projector_dims") or ())
        or None,
        head=_read_head(folder),
    )


def _from_backbone_file(path: Path, content: Any) -> TrainedEncoder:
    run = RunFolder(path.parent)
    info_path = run.encoder_info
    if not info_path.is_file():
        raise CheckpointError(
            f"{info_path} is missing: it describes the architecture of {path.name}"
        )
    try:
        fields = json.loads(info_path.read_text())
        info = EncoderInfo(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})
    except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"corrupt {info_path}: {error}; rewrite it from the run's config.yaml or rerun fit"
        ) from None
    if not isinstance(content, dict) or not content:
        raise CheckpointError(f"{path} holds no backbone weights")
    return TrainedEncoder(
        source=path, folder=run, info=info, backbone_state=content, head=_read_head(run)
    )


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read {path}: {reason}") from None
    return tensors, metadata


def encoder_info_from_metadata(metadata: dict[str, str], source: Path) -> EncoderInfo:
    """The :class:`EncoderInfo` stored in the header of one of our safetensors files."""
    try:
        return EncoderInfo(
            backbone=metadata["architecture"],
            in_channels=int(metadata["in_channels"]),
            small_image=json.loads(metadata["small_image"]),
            image_size=int(metadata["image_size"]),
            mean=tuple(json.loads(metadata["mean"])),
            std=tuple(json.loads(metadata["std"])),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{source}: incomplete or invalid barlowtwins header ({error}); export it again"
        ) from None


def _load_safetensors(path: Path, folder: RunFolder | None, projector: bool) -> TrainedEncoder:
    tensors, metadata = _read_safetensors(path)
    content = metadata.get(FORMAT_KEY)
    if content not in (ENCODER_CONTENT, CLASSIFIER_CONTENT, FULL_CONTENT):
        raise CheckpointError(
            f"{path} was not written by `barlowtwins export` (no {FORMAT_KEY} in its header)"
        )
    if projector and content != FULL_CONTENT:
        raise CheckpointError(f"{path} holds only the encoder, not the projector")
    try:
        return _encoder_of_export(path, folder, content, tensors, metadata)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{path}: incomplete or invalid barlowtwins header ({error}); export it again"
        ) from None


def _encoder_of_export(
    path: Path,
    folder: RunFolder | None,
    content: str,
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
) -> TrainedEncoder:
    info = encoder_info_from_metadata(metadata, path)
    extra = {key: value for key, value in metadata.items() if key != FORMAT_KEY}
    if content == FULL_CONTENT:
        parts: dict[str, dict[str, Tensor]] = {"backbone": {}, "projector": {}}
        for key, value in tensors.items():
            part, _, name = key.partition(".")
            if part in parts:
                parts[part][name] = value
        return TrainedEncoder(
            source=path,
            folder=folder,
            info=info,
            backbone_state=parts["backbone"],
            projector_state=parts["projector"],
            projector_dims=tuple(int(d) for d in json.loads(metadata["projector_dims"])),
            metadata=extra,
        )
    head = None
    if content == CLASSIFIER_CONTENT:
        prefix = metadata["classifier"] + "."
        weight, bias = tensors.pop(prefix + "weight"), tensors.pop(prefix + "bias")
        classes = json.loads(metadata.get("classes", "null"))
        head = LinearHead(weight, bias, tuple(classes) if classes else None, fingerprint(tensors))
    return TrainedEncoder(
        source=path, folder=folder, info=info, backbone_state=tensors, head=head, metadata=extra
    )


def _read_head(folder: RunFolder | None) -> LinearHead | None:
    if folder is None or not folder.linear_head.is_file():
        return None
    path = folder.linear_head
    tensors, metadata = _read_safetensors(path)
    try:
        classes = json.loads(metadata.get("classes", "null"))
        return LinearHead(
            weight=tensors["weight"],
            bias=tensors["bias"],
            classes=tuple(classes) if classes else None,
            backbone_sha256=metadata["backbone_sha256"],
        )
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"corrupt {path}: {error}") from None


def save_head(folder: RunFolder, head: LinearHead, results: dict[str, Any]) -> Path:
    """Write a linear head and the evaluation it came from into a run folder, atomically.

    Args:
        folder: The ``fit`` run.
        head: The probe's classifier (standardisation folded in).
        results: What ``evaluate`` measured and how; written as ``evaluation.json``.

    Returns:
        The path of ``linear_head.safetensors``.
    """
    from safetensors.torch import save_file

    metadata = {
        "backbone_sha256": head.backbone_sha256,
        "classes": json.dumps(list(head.classes) if head.classes else None),
    }
    tensors = {
        "weight": head.weight.detach().cpu().contiguous(),
        "bias": head.bias.detach().cpu().contiguous(),
    }
    atomic_write(folder.linear_head, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(
        folder.evaluation, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n")
    )
    return folder.linear_head


def load_finetuned(path: str | Path) -> TrainedEncoder:
    """The classifier that ``barlowtwins finetune`` saved into a run.

    Args:
        path: The run folder (its ``finetuned.safetensors`` is read) or that file itself.

    Returns:
        The fine-tuned backbone with its head; :attr:`TrainedEncoder.folder` is the run, and
        :attr:`TrainedEncoder.metadata` holds the protocol under ``"finetuned"``.

    Raises:
        CheckpointError: If there is no such classifier, or the file is not one.
    """
    path = Path(path)
    file = path if path.is_file() else RunFolder(path).finetuned
    if not file.is_file():
        raise CheckpointError(
            f"no fine-tuned classifier in {path}: run `barlowtwins finetune RUN --percent P` "
            "on the run folder first"
        )
    run = _load_safetensors(file, RunFolder(file.parent), projector=False)
    if run.head is None or FINETUNED_KEY not in run.metadata:
        raise CheckpointError(f"{file} is not a classifier written by `barlowtwins finetune`")
    return run


def load_pretrained(path: str | Path, *, with_head: bool | str = False) -> nn.Module:
    """Load a trained encoder from a run or an export, offline, ready to use.

    The module is the source library's own (a torchvision ``ResNet`` or a timm model) in eval
    mode, fed images normalised as in training. ``module.pretrained_cfg`` (timm's convention)
    gives ``input_size``, ``mean`` and ``std``, and with a head ``num_classes`` and
    ``label_names``::

        encoder = barlowtwins.load_pretrained("runs/barlowtwins")  # or an export
        cfg = encoder.pretrained_cfg  # input_size (C, S, S), mean, std
        mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
        # images: float (B, C, S, S) in [0, 1]
        features = encoder((images - mean.view(-1, 1, 1)) / std.view(-1, 1, 1))

    Args:
        path: Anything :func:`load_trained_encoder` reads.
        with_head: Put a saved head in place of the classifier (``fc`` of a torchvision
            ResNet, timm's classifier), so the module returns logits: ``True`` or
            ``"linear"`` the linear head of ``evaluate --linear --save-head`` (or of an
            exported classifier), ``"finetuned"`` the classifier of ``barlowtwins finetune``
            (its backbone too, :func:`load_finetuned`).

    Returns:
        The encoder (or classifier) module.

    Raises:
        ValueError: For another ``with_head``.
        CheckpointError: If the source or the head asked for is missing.
    """
    if with_head not in (False, True, LINEAR_HEAD, FINETUNED_HEAD):
        raise ValueError(
            f"with_head must be False, True, {LINEAR_HEAD!r} or {FINETUNED_HEAD!r}; "
            f"got {with_head!r}"
        )
    run = load_finetuned(path) if with_head == FINETUNED_HEAD else load_trained_encoder(path)
    encoder = run.encoder()
    head = run.matching_head() if with_head else None
    if head is not None:
        attach_head(encoder, head)
    # timm's pretrained_cfg layout (what timm.data.resolve_data_config reads); the source
    # fields of a timm architecture's default config (its hub id, ImageNet licence) would be
    # wrong here, so the dict is built anew.
    cfg: dict[str, Any] = {
        "architecture": run.info.backbone,
        "input_size": (run.info.in_channels, run.info.image_size, run.info.image_size),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": run.info.mean,
        "std": run.info.std,
        "num_classes": head.num_classes if head is not None else 0,
        "classifier": classifier_name(encoder),
    }
    if head is not None and head.classes:
        cfg["label_names"] = list(head.classes)
    # timm's attribute for what a model expects; torch types module attributes as modules.
    encoder.pretrained_cfg = cfg  # type: ignore[assignment]
    return encoder
