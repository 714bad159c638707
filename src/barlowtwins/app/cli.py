"""The ``barlowtwins`` command: ``fit``, ``embed``, ``evaluate``, ``finetune``, ``neighbours``,
``export``, ``shards`` and ``recipes``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from barlowtwins.app.config import OPTIONS, ConfigError, describe_batch, load_fit_config
from barlowtwins.app.export import FORMATS
from barlowtwins.app.recipes import DEFAULT_RECIPE, RECIPES
from barlowtwins.loss import NonFiniteLossError
from barlowtwins.nn.distributed import DistributedJobError
from barlowtwins.runs.files import CheckpointError, atomic_write
from barlowtwins.runs.folder import RunFolder
from barlowtwins.runs.loader import FINETUNED_HEAD, LINEAR_HEAD, RUN_SOURCES

_log = logging.getLogger("barlowtwins")


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertising tips (e.g. for its cloud logger) from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def _configure_logging() -> None:
    """Print our messages plainly and Lightning's once, without its tips and internal notices.

    The ``lightning`` package logger has a console handler of its own; letting its records
    propagate to the root handler as well printed every Lightning line twice.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning").propagate = False
    # torch deprecates a pytree class that Lightning still uses: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Our epoch metrics are rank 0's on purpose (the loss is global on every rank, the health
    # and monitor values are measured once): Lightning's advice to sync them does not apply.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningTips())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``barlowtwins`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        return args.run(args)
    except (
        ConfigError,
        CheckpointError,
        NonFiniteLossError,
        DistributedJobError,
        ValueError,
        OSError,
    ) as error:
        if os.environ.get("BARLOWTWINS_DEBUG"):
            raise
        print(f"barlowtwins: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("barlowtwins: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    """The line a user reads for ``error``: its first line, or for an error re-raised from a
    DataLoader worker ("Caught DataError in DataLoader worker process 0. Original
    Traceback ...") the worker's own message, its last line."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    lines = text.splitlines()
    if "Original Traceback" in text and len(lines) > 1:
        _, colon, message = lines[-1].partition(": ")
        return message.strip() if colon else lines[-1]
    return lines[0]


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``barlowtwins`` command (the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="barlowtwins",
        description="Barlow Twins self-supervised pretraining (arXiv 2103.03230).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser(
        "fit",
        help="pretrain an encoder (resumes from --output)",
        description="Pretrain an encoder. Every hyperparameter comes from --recipe (default: "
        f"{DEFAULT_RECIPE} for fashion-mnist, folder for an image folder), then --config, "
        "then these flags; 'auto' values follow from the data and the hardware.",
    )
    fit.add_argument("--config", type=Path, help="YAML file with any of the options below")
    fit.add_argument("--print-config", action="store_true", help="print the resolved config")
    default_recipe = RECIPES[DEFAULT_RECIPE].hparams.to_dict()
    for name, field in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if name in default_recipe:
            help_text += f" (from the recipe; {DEFAULT_RECIPE}: {_shown(default_recipe[name])})"
        elif field.default is not None and not field.is_required():
            help_text += f" (default: {_shown(field.default)})"
        # Values stay strings: FitConfig validates and converts them, with one-line errors.
        if field.annotation is bool or set(get_args(field.annotation)) == {bool, type(None)}:
            fit.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif get_origin(field.annotation) is tuple:
            fit.add_argument(flag, nargs="+", default=None, metavar="N", help=help_text)
        else:
            fit.add_argument(flag, default=None, metavar=_metavar(field.annotation), help=help_text)
    fit.set_defaults(run=_run_fit)

    recipes = commands.add_parser("recipes", help="list the named recipes and their sources")
    recipes.add_argument("name", nargs="?", help="show every value of this recipe")
    recipes.set_defaults(run=_run_recipes)

    embed = commands.add_parser("embed", help="write backbone features of images to .npz")
    embed.add_argument("checkpoint", type=Path, help=RUN_SOURCES)
    embed.add_argument(
        "--data", required=True, help="fashion-mnist[:train|:test], a folder, or shards"
    )
    embed.add_argument("--output", type=Path, required=True, help="the .npz file to write")
    _add_inference_arguments(embed)
    _add_s3_endpoint(embed)
    embed.set_defaults(run=_run_embed)

    evaluate = commands.add_parser("evaluate", help="kNN / linear-probe accuracy of an encoder")
    evaluate.add_argument("checkpoint", type=Path, help=RUN_SOURCES)
    evaluate.add_argument("--train", default="fashion-mnist:train", help="labelled train data")
    evaluate.add_argument("--test", default="fashion-mnist:test", help="labelled test data")
    evaluate.add_argument(
        "--knn-k",
        type=int,
        default=200,
        help="neighbours of a kNN vote scored beside the standard protocols "
        "(k=20 T=0.07 and k=200 T=0.1)",
    )
    evaluate.add_argument("--knn-temperature", type=float, default=0.1, help="its temperature")
    evaluate.add_argument("--linear", action="store_true", help="also train a linear probe")
    evaluate.add_argument("--linear-epochs", type=int, default=100)
    evaluate.add_argument(
        "--save-head",
        action="store_true",
        help="with --linear: save the probe's classifier and these results into the run folder "
        "(linear_head.safetensors, evaluation.json) for export --with-head and the model card",
    )
    evaluate.add_argument("--json", type=Path, help="also write the results as JSON")
    _add_inference_arguments(evaluate)
    _add_s3_endpoint(evaluate)
    evaluate.set_defaults(run=_run_evaluate)
    _add_shards(commands)
    _add_finetune(commands)
    _add_neighbours(commands)

    export = commands.add_parser(
        "export",
        help="write the encoder as safetensors, ONNX, a Hugging Face folder or the full model",
        description="Formats: "
        + "; ".join(f"{name}: {text}" for name, text in FORMATS.items())
        + ".",
    )
    export.add_argument("source", type=Path, metavar="RUN", help=RUN_SOURCES)
    export.add_argument(
        "--format", required=True, metavar="FORMAT", help="one of: " + ", ".join(FORMATS)
    )
    export.add_argument(
        "--output", type=Path, required=True, help="the file (a folder for hf) to write"
    )
    export.add_argument(
        "--with-head",
        nargs="?",
        const=LINEAR_HEAD,
        default=False,
        choices=(LINEAR_HEAD, FINETUNED_HEAD),
        help="export a classifier (safetensors, onnx, hf): 'linear' (the default) puts the "
        "linear head saved by `evaluate --linear --save-head` on the encoder; 'finetuned' "
        "takes the classifier that `finetune` trained (backbone and head)",
    )
    export.add_argument("--force", action="store_true", help="replace an existing output")
    export.set_defaults(run=_run_export)
    return parser


def _add_finetune(commands: Any) -> None:
    """``finetune``: its options, with the defaults of :class:`FinetuneSettings`."""
    from barlowtwins.evaluation.finetune import FinetuneSettings

    default = FinetuneSettings()
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune on 1 %% or 10 %% of the labels, against random init and a linear probe",
        description="Train the backbone and a linear head together on a class-balanced subset "
        "of the labels (the paper's semi-supervised protocol, official evaluate.py --weights "
        "finetune), the same network from random init the same way, and a linear probe on the "
        "frozen features of the subset; print their test top-1 and save the fine-tuned "
        "classifier into the run (finetuned.safetensors, finetune.json, finetune_labels.csv) "
        "for `export --with-head finetuned`.",
    )
    finetune.add_argument("checkpoint", type=Path, metavar="RUN", help=RUN_SOURCES)
    amount = finetune.add_mutually_exclusive_group(required=True)
    amount.add_argument("--percent", type=float, help="percent of the labels, in (0, 100]")
    amount.add_argument("--labels", type=int, help="number of labels, split evenly over classes")
    amount.add_argument(
        "--subset", type=Path, help="train on the images a finetune_labels.csv lists"
    )
    finetune.add_argument("--train", default="fashion-mnist:train", help="labelled train data")
    finetune.add_argument("--test", default="fashion-mnist:test", help="labelled test data")
    finetune.add_argument(
        "--seed", type=int, default=default.seed, help="seed of the subset, init and batches"
    )
    finetune.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default: at least {default.min_epochs} epochs and {default.min_steps} steps",
    )
    finetune.add_argument(
        "--batch-size", type=int, default=default.batch_size, help="images per step (%(default)s)"
    )
    finetune.add_argument(
        "--lr-backbone",
        type=float,
        default=default.lr_backbone,
        help="peak SGD learning rate of the backbone (%(default)s)",
    )
    finetune.add_argument(
        "--lr-classifier",
        type=float,
        default=default.lr_classifier,
        help="peak SGD learning rate of the linear head (%(default)s)",
    )
    finetune.add_argument(
        "--weight-decay", type=float, default=default.weight_decay, help="(%(default)s)"
    )
    finetune.add_argument(
        "--hflip-prob",
        type=float,
        default=default.hflip_prob,
        help="horizontal-flip probability (%(default)s; 0 where orientation matters)",
    )
    finetune.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the same network from random init (default: yes)",
    )
    finetune.add_argument(
        "--output", type=Path, help="the folder to write into (default: the run folder)"
    )
    finetune.add_argument(
        "--precision", help="autocast precision (default: bf16 where the hardware runs it fast)"
    )
    finetune.add_argument("--data-dir", type=Path, help="Fashion-MNIST directory")
    finetune.add_argument("--download", action="store_true", help="download Fashion-MNIST")
    finetune.add_argument("--max-samples", type=int, help="draw from a subset of --train")
    finetune.add_argument(
        "--accelerator",
        "--device",
        dest="accelerator",
        default="auto",
        help="auto (a GPU when there is one), cpu, gpu, cuda or cuda:N (default: auto)",
    )
    finetune.set_defaults(run=_run_finetune)


def _add_neighbours(commands: Any) -> None:
    """``neighbours``: its options, with the defaults of :class:`NeighbourSettings`."""
    from barlowtwins.app.neighbours import NeighbourSettings

    default = NeighbourSettings()
    neighbours = commands.add_parser(
        "neighbours",
        help="pictures of what an encoder learned: nearest neighbours, near-duplicates",
        description="Draw random query images of --data, each followed by its nearest "
        "neighbours in the encoder's embedding (neighbours.png), and list the pairs above a "
        "cosine similarity as near-duplicates (duplicates.csv, duplicates.png).",
    )
    neighbours.add_argument("checkpoint", type=Path, metavar="RUN", help=RUN_SOURCES)
    neighbours.add_argument(
        "--data", required=True, help="a folder (labelled or not) or fashion-mnist[:train|:test]"
    )
    neighbours.add_argument(
        "--output", type=Path, help="the folder to write into (default: RUN/neighbours)"
    )
    neighbours.add_argument("--queries", type=int, default=default.queries, help="grid rows")
    neighbours.add_argument("--k", type=int, default=default.k, help="neighbours per query")
    neighbours.add_argument(
        "--threshold",
        type=float,
        default=default.threshold,
        help="cosine similarity from which a pair is a near-duplicate",
    )
    neighbours.add_argument(
        "--max-pairs", type=int, default=default.max_pairs, help="pairs listed at most"
    )
    neighbours.add_argument("--seed", type=int, default=default.seed, help="seed of the queries")
    _add_inference_arguments(neighbours)
    neighbours.set_defaults(run=_run_neighbours)


def _add_shards(commands: Any) -> None:
    """``shards``: its options, with the defaults of :mod:`barlowtwins.app.shards`."""
    from barlowtwins.app.shards import DEFAULT_CHUNK_BYTES, DEFAULT_QUALITY, DEFAULT_SIDE

    shards = commands.add_parser(
        "shards",
        help="write an image folder as LitData shards, for data larger than a disk",
        description="Shuffle the images of FOLDER (class subfolders give labels), shrink each "
        "to a shorter side of --side pixels (aspect kept) and write them as JPEGs, with their "
        "labels and source sizes, into LitData shards in the new folder OUTPUT. Train on them "
        "with fit --data OUTPUT, or upload OUTPUT as it is and give --data s3://bucket/prefix. "
        "An interrupted run starts again; a finished OUTPUT is left as it is.",
    )
    shards.add_argument("folder", type=Path, metavar="FOLDER", help="the image folder")
    shards.add_argument("output", type=Path, metavar="OUTPUT", help="the new folder of shards")
    shards.add_argument(
        "--side",
        type=int,
        default=DEFAULT_SIDE,
        help=f"shorter side of the stored images, never enlarged (default: {DEFAULT_SIDE})",
    )
    shards.add_argument(
        "--quality",
        type=int,
        default=DEFAULT_QUALITY,
        help=f"JPEG quality, 1-95 (default: {DEFAULT_QUALITY})",
    )
    shards.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default: 0)")
    shards.add_argument("--workers", type=int, help="encoding processes (default: one per core)")
    shards.add_argument(
        "--chunk-bytes",
        default=DEFAULT_CHUNK_BYTES,
        help=f"bytes per shard (default: {DEFAULT_CHUNK_BYTES})",
    )
    shards.set_defaults(run=_run_shards)


def _add_s3_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--s3-endpoint",
        help="endpoint URL of s3:// shards (default: boto3's, e.g. from AWS_ENDPOINT_URL)",
    )


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="Fashion-MNIST directory")
    parser.add_argument("--download", action="store_true", help="download Fashion-MNIST")
    parser.add_argument("--max-samples", type=int, help="use a subset")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--accelerator",
        "--device",
        dest="accelerator",
        default="auto",
        help="auto (a GPU when there is one), cpu, gpu, cuda or cuda:N (default: auto)",
    )


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def _metavar(annotation: Any) -> str:
    """``INT``, ``FLOAT``, ``STR`` or the choices, for --help."""
    kinds = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    if get_origin(annotation) is not None and all(isinstance(k, str | int) for k in kinds):
        return "{" + ",".join(map(str, kinds)) + "}"
    names = {int: "INT", float: "FLOAT", str: "STR"}
    return "|".join(names.get(k, "STR") for k in kinds if isinstance(k, type)) or "STR"


def _run_fit(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in OPTIONS}
    config = load_fit_config(args.config, overrides)
    if args.print_config:
        print(describe_batch(config))
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from barlowtwins.app.fit import fit

    fit(config)
    return 0


def _run_recipes(args: argparse.Namespace) -> int:
    if args.name is not None:
        recipe = RECIPES.get(args.name)
        if recipe is None:
            raise ConfigError(f"unknown recipe {args.name!r}; choose one of: {', '.join(RECIPES)}")
        print(f"{recipe.name}: {recipe.purpose}\nsource: {recipe.source}")
        print(f"published: {recipe.published}\nmeasured here: {recipe.measured}\n")
        print(yaml.safe_dump(recipe.hparams.to_dict(), sort_keys=False), end="")
        return 0
    for recipe in RECIPES.values():
        print(f"{recipe.name:<18} {recipe.purpose}")
        print(f"{'':<18} source: {recipe.source}")
        print(f"{'':<18} published: {recipe.published}; measured here: {recipe.measured}")
    print("\nbarlowtwins recipes NAME shows every value; barlowtwins fit --recipe NAME uses it.")
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from barlowtwins.app.inference import encode

    features, dataset = encode(
        args.checkpoint,
        args.data,
        data_dir=args.data_dir,
        download=args.download,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        s3_endpoint=args.s3_endpoint,
    )
    arrays: dict[str, Any] = {"embeddings": features.numpy()}
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels.numpy()
    if dataset.paths is not None:
        arrays["paths"] = np.array(dataset.paths)
    else:
        arrays["indices"] = np.arange(len(dataset))
    output = args.output if args.output.suffix == ".npz" else args.output.with_suffix(".npz")
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        # To an open file: given a name, np.savez would add ".npz" to the temporary one.
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(output, write)
    print(f"wrote {output}: {features.shape[0]} embeddings of size {features.shape[1]}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from barlowtwins.app.inference import evaluate_encoder

    accuracies = evaluate_encoder(
        args.checkpoint,
        args.train,
        args.test,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
        linear=args.linear,
        linear_epochs=args.linear_epochs,
        save_linear_head=args.save_head,
        data_dir=args.data_dir,
        download=args.download,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        s3_endpoint=args.s3_endpoint,
    )
    print(accuracies.table())
    if args.json:
        text = json.dumps(accuracies.to_dict(), indent=2) + "\n"
        atomic_write(args.json, lambda tmp: tmp.write_text(text))
    if args.save_head:
        folder = RunFolder(Path())
        print(
            f"saved the linear head into the run folder ({folder.linear_head}, {folder.evaluation})"
        )
    return 0


def _run_shards(args: argparse.Namespace) -> int:
    from barlowtwins.app.shards import write_shards

    manifest = write_shards(
        args.folder,
        args.output,
        side=args.side,
        quality=args.quality,
        seed=args.seed,
        workers=args.workers,
        chunk_bytes=args.chunk_bytes,
    )
    labels = "unlabelled" if manifest.classes is None else f"{len(manifest.classes)} classes"
    print(
        f"{args.output}: {manifest.count} images ({labels}), {len(manifest.unusable)} files "
        "left out; train with --data OUTPUT, or upload OUTPUT and give --data s3://..."
    )
    return 0


def _run_finetune(args: argparse.Namespace) -> int:
    from barlowtwins.app.finetune import LabelAmount, finetune
    from barlowtwins.evaluation.finetune import FinetuneSettings

    settings = FinetuneSettings(
        lr_backbone=args.lr_backbone,
        lr_classifier=args.lr_classifier,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        epochs=args.epochs,
        hflip_prob=args.hflip_prob,
        seed=args.seed,
    )
    amount = (
        None if args.subset is not None else LabelAmount(percent=args.percent, count=args.labels)
    )
    accuracies, folder = finetune(
        args.checkpoint,
        amount,
        train=args.train,
        test=args.test,
        settings=settings,
        subset=args.subset,
        baseline=args.baseline,
        output=args.output,
        precision=args.precision,
        accelerator=args.accelerator,
        data_dir=args.data_dir,
        download=args.download,
        max_samples=args.max_samples,
    )
    print(accuracies.table())
    print(
        f"\nwrote {folder.path}: {folder.finetuned.name}, {folder.finetune_results.name}, "
        f"{folder.finetune_labels.name}"
    )
    return 0


def _run_neighbours(args: argparse.Namespace) -> int:
    from barlowtwins.app.neighbours import NeighbourSettings, find_neighbours

    settings = NeighbourSettings(
        queries=args.queries,
        k=args.k,
        threshold=args.threshold,
        max_pairs=args.max_pairs,
        seed=args.seed,
    )
    summary, output = find_neighbours(
        args.checkpoint,
        args.data,
        args.output,
        settings=settings,
        accelerator=args.accelerator,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        download=args.download,
        max_samples=args.max_samples,
    )
    if summary.same_class is not None:
        print(
            f"the {settings.k} nearest neighbours share their query's class for "
            f"{summary.same_class:.1f} % of {summary.agreement_queries} random queries"
        )
    print(
        f"{summary.pairs} pairs of {summary.images} images at cosine similarity >= "
        f"{summary.threshold} ({summary.groups} groups; {summary.pairs_listed} listed)"
    )
    print(f"wrote {output}: {', '.join(summary.files)}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from barlowtwins.app.export import export

    output = export(
        args.source, args.format, args.output, with_head=args.with_head, force=args.force
    )
    print(f"wrote {output} ({args.format})")
    return 0


__all__ = ["main"]
