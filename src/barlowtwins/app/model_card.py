"""The model card of a Hugging Face export: the ``README.md`` of ``barlowtwins export --format hf``.

It is written from what the run folder recorded (``config.yaml``, ``results.json``,
``evaluation.json``, ``finetune.json``, ``metrics.csv``, the plots), with YAML front matter as
``huggingface_hub`` reads it, and never fills in what the run did not record. It is kept apart
from the format writers (:mod:`barlowtwins.app.export`) because it is prose about the run, not
a file format: the writers only call :func:`model_card`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from barlowtwins.encoder import (
    EncoderInfo,
    LinearHead,
    architecture_name,
    build_code,
    feature_dim,
    is_timm,
    timm_name,
)
from barlowtwins.evaluation.finetune import FinetuneAccuracies
from barlowtwins.evaluation.results import TRAINED, Accuracies
from barlowtwins.runs.loader import FINETUNED_KEY, HF_PLOTS, HF_WEIGHTS, TrainedEncoder


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return content if isinstance(content, dict) else None


def model_card(
    run: TrainedEncoder, encoder: nn.Module, head: LinearHead | None, plots: list[str]
) -> str:
    """The ``README.md`` of the Hugging Face folder, from what the run folder recorded.

    The YAML front matter follows the Hugging Face model card conventions (``library_name``,
    ``tags``, ``datasets``, ``metrics``, ``pipeline_tag``, ``model-index`` with the measured
    results). Nothing is filled in that the run did not record.
    """
    info = run.info
    folder = run.folder
    config = _read_yaml(folder.config) if folder else None
    results = _read_json(folder.results) if folder else None
    evaluation = _read_json(folder.evaluation) if folder else None
    if evaluation is not None and "results" not in evaluation:
        # `evaluate --json RUN/evaluation.json` writes the results alone.
        evaluation = {"results": evaluation, "protocol": {}}
    data = str(config.get("data", "")) if config else ""
    fashion = data.split(":")[0] == "fashion-mnist"
    dataset_name = "Fashion-MNIST" if fashion else (data or "unrecorded data")
    library = "timm" if is_timm(info) else "torchvision"
    trained = Accuracies.from_dict(results) if results else None
    evaluated = Accuracies.from_dict(evaluation["results"]) if evaluation else None
    finetune = _read_finetune(folder.finetune_results) if folder else None
    # The classifier exported is the one `finetune` trained (its header says so).
    finetuned = head is not None and FINETUNED_KEY in run.metadata
    metrics = _card_metrics(trained, evaluated)
    if finetuned and finetune is not None:
        metrics.append(
            (
                f"fine-tuned top-1 ({finetune[0].labels} labels)",
                round(float(finetune[0].finetuned[TRAINED]), 2),
            )
        )

    front: dict[str, Any] = {
        "library_name": "barlowtwins",
        "tags": [
            "barlowtwins",
            "barlow-twins",
            "self-supervised-learning",
            "image-feature-extraction",
            library,
            architecture_name(info),
        ],
        "pipeline_tag": "image-classification" if head else "image-feature-extraction",
    }
    if fashion:
        front["datasets"] = ["zalando-datasets/fashion_mnist"]
    if metrics:
        front["metrics"] = ["accuracy"]
        front["model-index"] = [
            {
                "name": f"barlowtwins-{architecture_name(info)}",
                "results": [
                    {
                        "task": {"type": "image-classification", "name": name},
                        "dataset": {
                            "name": dataset_name,
                            "type": "zalando-datasets/fashion_mnist" if fashion else data,
                            "split": "test",
                        },
                        "metrics": [{"type": "accuracy", "value": value, "name": name}],
                    }
                    for name, value in metrics
                ],
            }
        ]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    title = ("fine-tuned " if finetuned else "") + ("classifier" if head else "encoder")
    lines += [
        f"# Barlow Twins {info.backbone} {title}" + (f" ({dataset_name})" if data else ""),
        "",
        "A "
        + ("torchvision ResNet" if library == "torchvision" else "timm model")
        + f" (`{info.backbone}`, {info.in_channels} input channel"
        + ("s" if info.in_channels > 1 else "")
        + f", {'small-image stem, ' if info.small_image else ''}"
        + f"{feature_dim(info, encoder)}-d features) pretrained with "
        "Barlow Twins (Zbontar et al. 2021, [arXiv 2103.03230](https://arxiv.org/abs/2103.03230))"
        " by the [barlowtwins](https://pypi.org/project/barlowtwins/) library"
        + (
            f", then fine-tuned end to end with a linear classifier over {head.num_classes} "
            "classes (`barlowtwins finetune`)."
            if head and finetuned
            else f", with a linear classifier over {head.num_classes} classes trained on its "
            "frozen features."
            if head
            else "."
        ),
        "",
    ]
    lines += _training_section(config, results)
    lines += _results_section(trained, evaluated, (evaluation or {}).get("protocol"))
    if finetune is not None:
        lines += _finetune_section(*finetune, exported=finetuned)
    lines += _health_section(folder.metrics if folder else None, info, config)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(name).stem}]({HF_PLOTS}/{name})" for name in plots]
        lines.append("")
    lines += _loading_section(run, encoder, head)
    return "\n".join(lines) + "\n"


def _card_metrics(
    trained: Accuracies | None, evaluated: Accuracies | None
) -> list[tuple[str, float]]:
    """The model index's metrics: ``fit``'s kNN under each protocol and ``evaluate``'s probe."""
    metrics: list[tuple[str, float]] = []
    for protocol in trained.protocols if trained else []:
        scores = trained.knn[protocol.label] if trained else {}
        if TRAINED in scores:
            metrics.append((f"kNN top-1 ({protocol.label})", round(float(scores[TRAINED]), 2)))
    probe = evaluated.linear_probe.get(TRAINED) if evaluated else None
    if probe is not None:
        metrics.append(("linear probe top-1", round(float(probe), 2)))
    return metrics


def _read_finetune(path: Path) -> tuple[FinetuneAccuracies, dict[str, Any]] | None:
    """The results and protocol of ``finetune.json``, or None when absent or unreadable."""
    content = _read_json(path) or {}
    try:
        return FinetuneAccuracies.from_dict(content["results"]), dict(content["protocol"])
    except (KeyError, TypeError, ValueError):
        return None


def _finetune_section(
    results: FinetuneAccuracies, protocol: dict[str, Any], *, exported: bool
) -> list[str]:
    lines = [
        "## Fine-tuning with few labels",
        "",
        f"`barlowtwins finetune` trained the backbone and a linear head together on "
        f"{results.labels} labels ({results.percent:.4g} % of {results.train_images} "
        f"training images, class-balanced) for {results.epochs} epochs ({results.steps} "
        f"steps), and scored them on {results.test_images} test images; beside it, the same "
        "network trained identically from random initialisation, and a linear probe on the "
        "frozen pretrained features of the same labels"
        + (" (this model is the first row's classifier)" if exported else "")
        + ":",
        "",
        "| model | top-1 % |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value:.2f} |" for name, value, _ in results.rows()]
    lines += ["", "Protocol: `" + json.dumps(protocol) + "`", ""]
    return lines


def _training_section(config: dict[str, Any] | None, results: dict[str, Any] | None) -> list[str]:
    lines = ["## Training", ""]
    if config is None:
        return [*lines, "The run folder recorded no `config.yaml`: the recipe is unknown.", ""]
    results = results or {}
    hardware = results.get("hardware")
    if isinstance(hardware, dict):
        hardware = (
            f"{hardware.get('device')} ({hardware.get('accelerator')}), "
            f"{hardware.get('devices')} device(s) x {hardware.get('num_nodes')} node(s), "
            f"precision {hardware.get('precision')}, torch {hardware.get('torch')}"
        )
    facts = [
        ("data", f"`{config.get('data')}`"),
        ("training images", results.get("train_images")),
        ("epochs", config.get("epochs")),
        ("batch", _batch_fact(config)),
        ("optimizer", f"{config.get('optimizer')}, base lr {config.get('lr_weights')} (weights)"),
        ("projector", config.get("projector_dims")),
        ("lambda", config.get("lambda_param")),
        (
            "training time",
            f"{results['training_minutes']} min" if "training_minutes" in results else None,
        ),
        ("hardware", hardware or "not recorded by this run"),
    ]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in facts if value is not None]
    lines += [
        "",
        "The whole recipe, the run's `config.yaml` (`barlowtwins fit --config` reruns it):",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return lines


def _batch_fact(config: dict[str, Any]) -> str:
    """The batch of a run's config: global since ``batch_size_per_device`` exists, per process
    in the config of a run from before."""
    split = f"{config.get('devices')} device(s) x {config.get('num_nodes')} node(s)"
    per_device = config.get("batch_size_per_device")
    if per_device is None:
        return f"{config.get('batch_size')} per process x {split}"
    return f"{config.get('batch_size')} global = {per_device} per device x {split}"


def _results_section(
    trained: Accuracies | None, evaluated: Accuracies | None, protocol: dict[str, Any] | None
) -> list[str]:
    lines = ["## Results", ""]
    if trained and trained.knn:
        columns = [protocol.label for protocol in trained.protocols]
        lines += [
            f"Weighted kNN top-1 accuracy (%) on {trained.test_images} test images: cosine "
            f"similarity, the k nearest of all {trained.train_images} training images vote "
            "with weight exp(similarity / T) (measured by `barlowtwins fit` at the end of "
            "training):",
            "",
            "| encoder | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        lines += [
            f"| {name} | "
            + " | ".join(_percent(trained.knn[label].get(name)) for label in columns)
            + " |"
            for name in trained.encoders
            if any(name in trained.knn[label] for label in columns)
        ]
        lines.append("")
    if evaluated:
        where = (
            f" (train data `{protocol.get('train')}`, test data `{protocol.get('test')}`)"
            if protocol
            else " (its protocol was not recorded)"
        )
        rows: list[tuple[str, Any]] = [
            ("train images", evaluated.train_images),
            ("test images", evaluated.test_images),
        ]
        rows += [
            (f"kNN top-1 % ({protocol.label})", evaluated.knn[protocol.label][TRAINED])
            for protocol in evaluated.protocols
            if TRAINED in evaluated.knn[protocol.label]
        ]
        if TRAINED in evaluated.linear_probe:
            rows.append(("linear probe top-1 %", evaluated.linear_probe[TRAINED]))
        lines += [f"`barlowtwins evaluate`{where}:", "", "| metric | value |", "|---|---:|"]
        lines += [
            f"| {name} | {value:.2f} |" if isinstance(value, float) else f"| {name} | {value} |"
            for name, value in rows
        ]
        lines.append("")
        if protocol:
            lines += ["Protocol: `" + json.dumps(protocol) + "`", ""]
    if not (trained and trained.knn) and not evaluated:
        lines += ["No accuracy was measured for this run.", ""]
    return lines


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _last_logged(metrics_csv: Path) -> dict[str, tuple[int, float]]:
    """The last logged value (and its step) of every column of a Lightning metrics.csv."""
    last: dict[str, tuple[int, float]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name not in ("epoch", "step") and value not in ("", None):
                    last[name] = (int(row["step"]), float(value))
    return last


def _health_section(
    metrics_csv: Path | None, info: EncoderInfo, config: dict[str, Any] | None
) -> list[str]:
    if metrics_csv is None or not metrics_csv.is_file():
        return []
    from barlowtwins import health

    try:
        last = _last_logged(metrics_csv)
    except (OSError, ValueError, KeyError):
        return []
    dims = (config or {}).get("projector_dims") or []
    rows = []
    if health.LOSS_PER_FEATURE in last:
        step, value = last[health.LOSS_PER_FEATURE]
        rows.append(f"| loss / D | {value:.4f} | step {step} |")
    if health.INVARIANCE in last and dims:
        step, value = last[health.INVARIANCE]
        rows.append(f"| invariance term / D | {value / dims[-1]:.4f} | step {step} |")
    if health.EMBEDDING_STD in last:
        step, value = last[health.EMBEDDING_STD]
        healthy = f" (healthy: 1/sqrt(D) = {dims[-1] ** -0.5:.4f})" if dims else ""
        rows.append(f"| embedding std{healthy} | {value:.4f} | step {step} |")
    if health.EFFECTIVE_RANK in last:
        step, value = last[health.EFFECTIVE_RANK]
        rows.append(f"| effective rank of held-out features | {value:.1f} | step {step} |")
    if not rows:
        return []
    return [
        "## Training health",
        "",
        "Last logged values (`metrics.csv` of the run; what they mean: "
        "`docs/is_it_working.md` of barlowtwins):",
        "",
        "| metric | value | when |",
        "|---|---:|---|",
        *rows,
        "",
    ]


def _loading_section(run: TrainedEncoder, encoder: nn.Module, head: LinearHead | None) -> list[str]:
    info = run.info
    output = "logits" if head else "features"
    lines = [
        "## Use",
        "",
        "Inputs: images resized to "
        f"{info.image_size}x{info.image_size}, {info.in_channels} channel(s), scaled to [0, 1], "
        f"then normalised per channel with mean {list(info.mean)} and std {list(info.std)}.",
        "",
        "With barlowtwins (offline; `pretrained_cfg` carries the input size and normalisation):",
        "",
        "```python",
        "import barlowtwins",
        "",
        'model = barlowtwins.load_pretrained("PATH/TO/THIS/FOLDER"'
        + (", with_head=True)" if head else ")")
        + f"  # returns {output}",
        "```",
        "",
        "By hand, with " + ("timm" if is_timm(info) else "torchvision") + " and safetensors only:",
        "",
        "```python",
        "from safetensors.torch import load_file",
        build_code(info, encoder, head.num_classes if head else 0),
        f'model.load_state_dict(load_file("PATH/TO/THIS/FOLDER/{HF_WEIGHTS}"))  # strict',
        "model.eval()",
        "```",
        "",
    ]
    if timm_name(info) is not None:
        lines += [
            "timm also reads this folder itself (its `local-dir:` source, timm 1.0.31):",
            "",
            "```python",
            "import timm",
            "",
            'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)',
            "```",
            "",
        ]
    return lines
