"""Shards read with LitData (``barlowtwins.data.streaming``): what they hold, how LitData splits
an epoch over the processes, and ``fit`` on 2 real gloo processes and from a real S3 server.

The processes of a distributed run are simulated in the in-process tests the way LitData finds
them when it builds a dataset (``WORLD_SIZE`` and ``GLOBAL_RANK``); the ``fit`` tests run them.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from _fit_process import (
    ENV,
    TWO_CPU_PROCESSES,
    WAIT_S,
    children,
    logged_fit,
    paused_fit,
    wait_for_pause,
)
from barlowtwins.app.cli import main
from barlowtwins.app.config import load_fit_config
from barlowtwins.app.fit import build_module
from barlowtwins.data import DataError, DataSpec, load_data
from barlowtwins.data.streaming import StreamingImages, StreamingLoader
from barlowtwins.runs.files import safe_load
from barlowtwins.training.module import view_seed

# 75 images in 3 classes; global batches of 16 (8 per process): 4 steps an epoch, and the
# 75 mod 16 = 11 images one process would leave out of each epoch.
_IMAGES, _CLASSES, _BATCH, _EPOCHS = 75, 3, 16, 2
_STEPS = _IMAGES // _BATCH
# Small shards (about 5 images each), so that an epoch mixes many of them.
_CHUNK_BYTES = "6KB"
_TWO_PROCESSES = [
    *TWO_CPU_PROCESSES,
    "--num-workers",
    "2",
]
# A checkpoint every 2 steps; the killed run stops after step 3 of the first epoch's 4 and
# resumes from the one after step 2.
_EVERY, _KILL_STEP = 2, 3


def _write_folder(root: Path, count: int = _IMAGES, classes: int = _CLASSES) -> Path:
    """``count`` distinct images of different sizes and aspect ratios, in class subfolders: a
    rotated gradient, and a green of their own."""
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (30 + 3 * (i % 11), 24 + 5 * (i % 7))
        gradient = Image.linear_gradient("L").rotate(7 * i).resize(size)
        green = Image.new("L", size, 3 * i)
        flipped = gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = Image.merge("RGB", (gradient, green, flipped))
        image.save(folder / f"{i:03d}.jpg", quality=95)
    return root


def _write_shards(folder: Path, output: Path, *options: str) -> Path:
    arguments = ["shards", str(folder), str(output), "--side", "32", "--workers", "2"]
    assert main([*arguments, "--chunk-bytes", _CHUNK_BYTES, *options]) == 0
    return output


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("streaming") / "images")


@pytest.fixture(scope="module")
def shards(source: Path) -> Path:
    return _write_shards(source, source.parent / "shards")


def test_a_folder_of_shards_or_an_s3_url_is_parsed_as_shards(shards: Path, source: Path) -> None:
    assert DataSpec.parse(str(shards)) == DataSpec("shards", shards=str(shards))
    assert DataSpec.parse("s3://bucket/prefix").shards == "s3://bucket/prefix"
    assert DataSpec.parse(str(source)).kind == "folder"


def test_the_shards_hold_every_image_once_with_its_label_and_source_size(
    shards: Path, source: Path
) -> None:
    data = load_data(str(shards), image_size=24)
    assert isinstance(data, StreamingImages)
    assert len(data) == _IMAGES and data.num_skipped == 0
    files = sorted(str(p.relative_to(source)) for p in source.rglob("*.jpg"))
    assert sorted(data.paths) == files
    assert data.paths != files  # shuffled when written
    assert data.classes == [f"class{c}" for c in range(_CLASSES)]
    folder = load_data(str(source), image_size=24)
    assert folder.paths is not None
    by_path = {os.path.relpath(path, source): i for i, path in enumerate(folder.paths)}
    canvases = torch.stack([folder[i][0] for i in range(len(folder))]).float()
    for index in range(len(data)):
        image, label, returned, size = data[index]
        expected = by_path[data.paths[index]]
        assert returned == index and label == folder[expected][1]
        with Image.open(source / data.paths[index]) as original:
            assert size.tolist() == [original.height, original.width]
        # The same whole image on the canvas as a folder run decodes, through one shrinking
        # and JPEG encoding more: within a few levels, and nearer than any other image.
        differences = (canvases - image.float()).abs().mean(dim=(1, 2, 3))
        assert differences[expected] < 10 and int(differences.argmin()) == expected, index


def test_max_samples_keeps_the_first_images_for_training_too(shards: Path) -> None:
    data = load_data(str(shards), image_size=8, max_samples=30)
    assert len(data) == 30 and data.labels is not None and len(data.labels) == 30
    seen = [i for batch in data.loader(8, seed=0) for i in batch[2].tolist()]
    assert len(seen) == len(set(seen)) == 24 and set(seen) <= set(range(30))


def _epoch_per_rank(
    data: StreamingImages, monkeypatch: pytest.MonkeyPatch, workers: int, epochs: int = 1
) -> list[list[list[list[int]]]]:
    """``[rank][epoch][batch] -> indices`` of 2 simulated processes, batches of 8 each."""
    ranks = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        loader = data.loader(_BATCH // 2, seed=0, num_workers=workers)
        ranks.append([[b[2].tolist() for b in loader] for _ in range(epochs)])
    return ranks


@pytest.mark.parametrize("workers", [0, 4])
@pytest.mark.parametrize("parallel_filesystem", [False, True])
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_an_epoch_gives_every_process_the_same_batches_and_leaves_out_the_remainder(
    shards: Path, monkeypatch: pytest.MonkeyPatch, workers: int, parallel_filesystem: bool
) -> None:
    if parallel_filesystem:
        # LitData's reads for NFS, Lustre, ...; with its windowed shuffle, 4 workers per
        # process over these 16 shards gave no batch at all (LitData 0.2.76).
        monkeypatch.setenv("LITDATA_POSIX_FAST", "1")
    data = StreamingImages(str(shards), image_size=8)
    ranks = _epoch_per_rank(data, monkeypatch, workers, epochs=2)
    for epoch in range(2):
        batches = [ranks[rank][epoch] for rank in (0, 1)]
        assert [len(b) for b in batches] == [_STEPS, _STEPS]
        assert all(len(batch) == _BATCH // 2 for rank in batches for batch in rank)
        seen = [i for rank in batches for batch in rank for i in batch]
        assert len(set(seen)) == len(seen) == _IMAGES - _IMAGES % _BATCH
    assert ranks[0][0] != ranks[0][1]  # each epoch shuffled anew


@pytest.mark.parametrize("epoch_batches", [None, 3])
def test_a_resumed_epoch_continues_and_the_next_one_is_an_uninterrupted_runs(
    shards: Path, monkeypatch: pytest.MonkeyPatch, epoch_batches: int | None
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GLOBAL_RANK", "1")
    data = StreamingImages(str(shards), image_size=8)

    def loader() -> StreamingLoader:
        return data.loader(_BATCH // 2, seed=3, num_workers=2, epoch_batches=epoch_batches)

    def take(loader: StreamingLoader, count: int) -> list[list[int]]:
        # As Lightning does: no more batches than the length, and no call after the last.
        batches = iter(loader)
        return [next(batches)[2].tolist() for _ in range(count)]

    unbroken = loader()
    length = len(unbroken)
    assert length == (_STEPS if epoch_batches is None else epoch_batches)
    epochs = [take(unbroken, length) for _ in range(3)]
    interrupted = loader()
    take(interrupted, length)
    before = take(interrupted, 2)
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    after = take(resumed, length - 2)
    assert before + after == epochs[1]
    assert take(resumed, length) == epochs[2]


def test_a_plain_http_endpoint_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    arguments = ["--data", "s3://bucket/shards", "--s3-endpoint", "http://127.0.0.1:9"]
    assert main(["fit", *arguments, "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "plain http" in error


def test_shards_without_a_manifest_are_refused(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(DataError, match="barlowtwins shards"):
        load_data(str(tmp_path), image_size=8)


# --- fit on 2 real gloo processes -------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    epoch: int
    indices: list[int]
    loss: float


def _batch_log(folder: Path) -> dict[int, dict[int, _Step]]:
    """``{rank: {step: _Step}}`` from ``_paused_fit.py``'s BATCH_LOG."""
    logs: dict[int, dict[int, _Step]] = {}
    for rank in (0, 1):
        logs[rank] = {}
        for line in (folder / f"rank-{rank}.txt").read_text().splitlines():
            step, epoch, indices, loss = line.split()
            logs[rank][int(step)] = _Step(
                int(epoch), [int(i) for i in indices.split(",")], float.fromhex(loss)
            )
    return logs


def _fit_arguments(data: Path, output: Path) -> list[str]:
    return [
        "fit",
        *_TWO_PROCESSES,
        "--data",
        str(data),
        "--image-size",
        "16",
        "--batch-size",
        str(_BATCH),
        "--epochs",
        str(_EPOCHS),
        "--checkpoint-every-n-steps",
        str(_EVERY),
        "--output",
        str(output),
    ]


@dataclass(frozen=True)
class _Runs:
    """One uninterrupted run; the same command killed (SIGKILL to both ranks) after step 3 of
    its first epoch; and the rerun that resumed it from the checkpoint after step 2."""

    unbroken: dict[int, dict[int, _Step]]
    unbroken_output: Path
    unbroken_logs: Path
    killed: dict[int, dict[int, _Step]]
    resumed: dict[int, dict[int, _Step]]
    resumed_from_step: int


@pytest.fixture(scope="module")
def runs(shards: Path) -> _Runs:
    root = shards.parent
    unbroken = root / "unbroken"
    logged_fit(
        _fit_arguments(shards, unbroken), root / "log-unbroken", root / "unbroken.log", "BATCH_LOG"
    )

    killed_output, killed_logs = root / "killed", root / "log-killed"
    killed_logs.mkdir()
    arguments, log, marker = _fit_arguments(shards, killed_output), root / "killed.log", root / "p"
    with paused_fit(arguments, _KILL_STEP, marker, log, {"BATCH_LOG": str(killed_logs)}) as run:
        assert wait_for_pause(run, marker, log) == _KILL_STEP
        rank1 = children(run.pid)
        for pid in (*rank1, run.pid):
            os.kill(pid, signal.SIGKILL)
    resumed_from = safe_load(killed_output / "checkpoints" / "last.ckpt")["global_step"]
    logged_fit(
        _fit_arguments(shards, killed_output),
        root / "log-resumed",
        root / "resumed.log",
        "BATCH_LOG",
    )
    return _Runs(
        _batch_log(root / "log-unbroken"),
        unbroken,
        root / "log-unbroken",
        _batch_log(killed_logs),
        _batch_log(root / "log-resumed"),
        resumed_from,
    )


@pytest.mark.slow
def test_every_rank_gets_the_same_number_of_full_batches(runs: _Runs) -> None:
    steps = list(range(_EPOCHS * _STEPS))
    for rank in (0, 1):
        assert sorted(runs.unbroken[rank]) == steps
        assert all(len(step.indices) == _BATCH // 2 for step in runs.unbroken[rank].values())
        assert [runs.unbroken[rank][s].epoch for s in steps] == [s // _STEPS for s in steps]


def _epoch_images(log: dict[int, dict[int, _Step]], epoch: int) -> list[int]:
    return [i for rank in (0, 1) for s in log[rank].values() if s.epoch == epoch for i in s.indices]


@pytest.mark.slow
def test_an_epoch_sees_each_image_once_and_leaves_out_one_processs_remainder(
    runs: _Runs,
) -> None:
    for epoch in range(_EPOCHS):
        seen = _epoch_images(runs.unbroken, epoch)
        assert len(set(seen)) == len(seen) == _IMAGES - _IMAGES % _BATCH
        assert set(seen) <= set(range(_IMAGES))
    assert _epoch_images(runs.unbroken, 0) != _epoch_images(runs.unbroken, 1)


@pytest.mark.slow
def test_a_kill_in_mid_epoch_and_a_rerun_see_each_unseen_image_once(runs: _Runs) -> None:
    assert runs.resumed_from_step == _EVERY  # the mid-epoch checkpoint
    for rank in (0, 1):
        # The killed run trained what the uninterrupted one did, up to the kill.
        assert sorted(runs.killed[rank]) == list(range(_KILL_STEP))
        for step in range(_KILL_STEP):
            assert runs.killed[rank][step].indices == runs.unbroken[rank][step].indices
        # The rerun: the rest of the epoch from the checkpoint on, then the next epoch, as the
        # uninterrupted run had them.
        assert sorted(runs.resumed[rank]) == list(range(_EVERY, _EPOCHS * _STEPS))
        for step, logged in runs.resumed[rank].items():
            assert logged.indices == runs.unbroken[rank][step].indices, (rank, step)
    before = [i for r in (0, 1) for s in range(_EVERY) for i in runs.killed[r][s].indices]
    after = [i for r in (0, 1) for s in range(_EVERY, _STEPS) for i in runs.resumed[r][s].indices]
    assert not set(before) & set(after)
    assert sorted(before + after) == sorted(_epoch_images(runs.unbroken, 0))


@pytest.mark.slow
def test_a_step_on_two_processes_is_one_process_on_both_batches(runs: _Runs, shards: Path) -> None:
    config = load_fit_config(runs.unbroken_output / "config.yaml", {})
    module = build_module(config, in_channels=3)
    module.model.load_state_dict(torch.load(runs.unbroken_logs / "initial.pt"))
    module.prepare_for(torch.device("cpu"))
    data = StreamingImages(str(shards), image_size=round(16 * 8 / 7))
    views: list[list[torch.Tensor]] = []
    for rank in (0, 1):
        items = [data[i] for i in runs.unbroken[rank][0].indices]
        images = torch.stack([item[0] for item in items])
        sizes = torch.stack([item[3] for item in items])
        generator = torch.Generator().manual_seed(view_seed(config.seed, rank, 0))
        views.append(module.make_views(images, generator, sizes))
    together = [torch.cat([views[0][v], views[1][v]]) for v in range(len(views[0]))]
    module.train()
    loss, _, _ = module.step_loss(together, 0)
    logged = [runs.unbroken[rank][0].loss for rank in (0, 1)]
    assert logged[0] == logged[1]  # every rank holds the global loss
    torch.testing.assert_close(loss.item(), logged[0], rtol=1e-5, atol=0)


# --- from a real S3 server ---------------------------------------------------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: ``(ca, cert, key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, issuer: str, public: object, signer: object, ca: bool) -> object:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            builder = builder.add_extension(x509.SubjectAlternativeName([address]), critical=False)
        return builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", "test CA", ca_key.public_key(), ca_key, True)
    server = certificate("127.0.0.1", "test CA", key.public_key(), ca_key, False)
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))  # type: ignore[attr-defined]
    paths[1].write_bytes(server.public_bytes(pem))  # type: ignore[attr-defined]
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 over https (LitData's shard reads refuse plain http), and
    the environment that points boto3 and obstore at it and nowhere else."""
    ca, cert, key = _certificates(tmp_path)
    port = _free_port()
    log = tmp_path / "moto.log"
    command = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1"]
    with open(log, "wb") as handle:
        server = subprocess.Popen(
            [*command, "-p", str(port), "-c", str(cert), "-k", str(key)],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    env = {
        "AWS_ENDPOINT_URL": f"https://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CA_BUNDLE": str(ca),  # boto3
        "SSL_CERT_FILE": str(ca),  # obstore
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "LITDATA_CACHE_DIR": str(tmp_path / "litdata-cache"),
        "NO_PROXY": "127.0.0.1",
    }
    try:
        deadline = time.monotonic() + WAIT_S
        while b"Running on" not in log.read_bytes():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.05)
        yield env
    finally:
        server.kill()
        server.wait()


def _client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        verify=env["AWS_CA_BUNDLE"],
    )


@pytest.mark.slow
def test_fit_and_embed_read_shards_from_s3(
    s3: dict[str, str], shards: Path, tmp_path: Path
) -> None:
    client = _client(s3)
    client.create_bucket(Bucket="images")
    for path in shards.iterdir():
        client.upload_file(str(path), "images", f"train/{path.name}")
    url = "s3://images/train"
    # Only the server's endpoint and credentials, whatever this machine's AWS settings are.
    environment = {**{k: v for k, v in ENV.items() if not k.startswith("AWS_")}, **s3}
    output = tmp_path / "run"
    fit = [
        "fit",
        "--data",
        url,
        "--val-data",
        url,
        "--accelerator",
        "cpu",
        "--backbone",
        "resnet10",
        "--projector-dims",
        "32",
        "32",
        "--image-size",
        "16",
        "--batch-size",
        str(_BATCH),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--knn-bank-size",
        "20",
        "--knn-k",
        "5",
        "--num-workers",
        "2",
        "--no-plots",
        "--output",
        str(output),
    ]
    for command in (
        fit,
        ["embed", str(output), "--data", url, "--output", str(tmp_path / "features.npz")],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "barlowtwins", *command],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            env=environment,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    assert results["train_images"] == _IMAGES and "knn" in json.dumps(results)
    features = np.load(tmp_path / "features.npz")
    assert features["embeddings"].shape[0] == _IMAGES
    assert sorted(features["paths"].tolist()) == sorted(
        str(p.relative_to(shards.parent / "images")) for p in shards.parent.glob("images/*/*")
    )
    # The shards came from the server, into LitData's cache.
    cached = list(Path(s3["LITDATA_CACHE_DIR"]).rglob("chunk-*.bin"))
    assert len(cached) == len(list(shards.glob("chunk-*.bin")))


@pytest.mark.slow
def test_the_benchmark_runs_at_toy_size() -> None:
    """``benchmarks/streaming.py`` end to end (its figures at this size mean nothing)."""
    options = ["--count", "80", "--batch", "16", "--batches", "1", "--workers", "0"]
    options += ["--counts", "100", "--repeats", "1", "--steps", "1"]
    result = subprocess.run(
        [sys.executable, "benchmarks/streaming.py", *options],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shards (LitData), 0 workers:" in result.stdout
    assert "fit on 100 images" in result.stdout
