"""The ``barlowtwins`` command: ``fit``, ``embed``, ``evaluate``, ``export`` and ``recipes``."""

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
from barlowtwins.runs.files import CheckpointError
from barlowtwins.runs.folder import RunFolder
from barlowtwins.runs.loader import RUN_SOURCES

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
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"barlowtwins: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("barlowtwins: interrupted", file=sys.stderr)
        return 130


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
    embed.add_argument("--data", required=True, help="fashion-mnist[:train|:test] or a folder")
    embed.add_argument("--output", type=Path, required=True, help="the .npz file to write")
    _add_inference_arguments(embed)
    embed.set_defaults(run=_run_embed)

    evaluate = commands.add_parser("evaluate", help="kNN / linear-probe accuracy of an encoder")
    evaluate.add_argument("checkpoint", type=Path, help=RUN_SOURCES)
    evaluate.add_argument("--train", default="fashion-mnist:train", help="labelled train data")
    evaluate.add_argument("--test", default="fashion-mnist:test", help="labelled test data")
    evaluate.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN vote")
    evaluate.add_argument("--knn-temperature", type=float, default=0.1)
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
    evaluate.set_defaults(run=_run_evaluate)

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
        action="store_true",
        help="include the linear head saved by `evaluate --linear --save-head` as the "
        "model's classifier (safetensors, onnx, hf)",
    )
    export.add_argument("--force", action="store_true", help="replace an existing output")
    export.set_defaults(run=_run_export)
    return parser


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
    np.savez(output, **arrays)
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
    )
    print(accuracies.table())
    if args.json:
        args.json.write_text(json.dumps(accuracies.to_dict(), indent=2) + "\n")
    if args.save_head:
        folder = RunFolder(Path())
        print(
            f"saved the linear head into the run folder ({folder.linear_head}, {folder.evaluation})"
        )
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from barlowtwins.app.export import export

    output = export(
        args.source, args.format, args.output, with_head=args.with_head, force=args.force
    )
    print(f"wrote {output} ({args.format})")
    return 0


__all__ = ["main"]
