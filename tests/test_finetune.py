"""fc7 finetune: resume after SIGKILL, the pool5 fast path, outputs, fc7 predict on a
fine-tune, bad inputs. Real JPEGs, random:0 weights.

A Ray Train fit with actors costs 20-40 s here (controller and workers start and import torch),
so these runs use `--num-workers 0`, Ray Train's local mode: the same training loop, one
worker, in the calling process. Two DDP workers against one are compared in test_ray_job.py,
on the cluster its `ray job submit` test starts anyway."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, jpeg_bytes
from PIL import Image

from jobs import run
from jobs.extract import main as extract
from jobs.finetune import main as finetune
from jobs.predict import main as predict
from pipeline.errors import ConfigError, ProvenanceMismatch, SourceError
from pipeline.finetune import FinetuneConfig
from pipeline.provenance import file_sha256

pytestmark = pytest.mark.slow

CLASSES = ("blue", "red")
# Frozen convolutions, no dropout, no augmentation: the only randomness left is the order
# (seeded), so runs that differ in workers, path or interruption must agree.
COMMON = ["--weights", "random:0", "--epochs", "4", "--batch-size", "6", "--lr", "0.02",
          "--dropout", "0", "--val-fraction", "0.25", "--patience", "4", "--seed", "3"]


def toy_jpeg(label: str, seed: int) -> bytes:
    """A noisy image that is mostly red or mostly blue: a problem that only a learnt head
    separates (the random:0 network's own head knows nothing of it)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, size=(48, 64, 3))
    pixels[..., 0 if label == "red" else 2] += 150
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """2 classes x 12 images: 18 train, 6 validation at --val-fraction 0.25."""
    root = tmp_path_factory.mktemp("toy") / "images"
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for j in range(12):
            (root / label / f"{j:02d}.jpg").write_bytes(toy_jpeg(label, 100 * c + j))
    return root


def _finetune(args: list[str]) -> int:
    return run("finetune", finetune, [str(a) for a in args])


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_worker(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "ft"
    assert _finetune([toy, "--out", out, *COMMON, "--num-workers", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def pool5(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool5") / "emb"
    assert extract([str(toy), "--out", str(out), "--weights", "random:0", "--layer", "pool5",
                    "--runner", "local"]) == 0
    return out


@pytest.fixture(scope="module")
def from_pool5(toy, pool5, tmp_path_factory) -> tuple[Path, str]:
    """The run of `one_worker` from pool5 embeddings, and what it printed."""
    out = tmp_path_factory.mktemp("from_pool5") / "ft"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _finetune([toy, "--out", out, *COMMON, "--num-workers", "0",
                          "--embeddings", pool5]) == 0
    return out, printed.getvalue()


def test_outputs_and_the_toy_problem_is_learnt(one_worker, toy):
    manifest = _manifest(one_worker)
    assert manifest["kind"] == "fc7.finetune" and manifest["schema_version"] == 1
    assert manifest["model"] == "alexnet" and manifest["classes"] == list(CLASSES)
    assert manifest["base_weights"]["weights"] == "random:0"
    assert manifest["base_weights"]["chain"] == []
    assert len(manifest["base_weights"]["sha256"]) == 64
    assert manifest["model_sha256"] == file_sha256(one_worker / "model.pt")
    assert manifest["data"]["train"] == 18 and manifest["data"]["val"] == 6
    assert manifest["path"]["taken"] == "images"
    assert manifest["hyperparameters"]["freeze"] == "features"
    assert [r["epoch"] for r in manifest["curves"]] == [1, 2, 3, 4]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "lr"} <= set(
        manifest["curves"][0])
    assert manifest["curves"][0]["lr"] == 0.02 > manifest["curves"][1]["lr"]  # cosine
    assert manifest["best_epoch"] == min(manifest["curves"], key=lambda r: r["val_loss"])["epoch"]
    assert (one_worker / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (one_worker / "checkpoints").exists()
    network = torchvision.models.alexnet(num_classes=2)
    network.load_state_dict(_weights(one_worker))
    # 18 training images all right (chance: 2**-18), and the 6 held-out ones.
    last = manifest["curves"][-1]
    assert last["train_accuracy"] == 1.0 and last["val_accuracy"] == 1.0
    assert manifest["curves"][0]["train_accuracy"] < 1.0
    assert last["train_loss"] < 0.75 * manifest["curves"][0]["train_loss"]


def test_predict_classifies_with_the_finetuned_network(one_worker, tmp_path, capsys):
    images = []
    for label in CLASSES:
        path = tmp_path / f"new_{label}.jpg"
        path.write_bytes(toy_jpeg(label, seed=999 + len(images)))
        images.append(path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    capsys.readouterr()
    status = run("predict", predict, [str(one_worker), "--image", *map(str, images),
                                      str(broken), "--top-k", "2"])
    captured = capsys.readouterr()
    assert status == 1
    lines = dict(line.split("\t", 1) for line in captured.out.strip().splitlines())
    for label, path in zip(CLASSES, images, strict=True):
        assert lines[str(path)].split("\t")[0] == label
    assert str(broken) in captured.err and "error" in captured.err


def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_weights(
    toy, pool5, from_pool5, tmp_path, capsys
):
    out = tmp_path / "ft"
    args = [*COMMON, "--num-workers", "0", "--embeddings", str(pool5)]
    command = [sys.executable, str(REPO / "jobs/finetune.py"), str(toy), "--out", str(out),
               *args]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "epoch-002.pt").exists() and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before its second epoch"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the driver, training in Ray Train's local mode
    process.wait()
    assert not (out / "model.pt").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch-*.pt"))[-1] == "epoch-002.pt"
    capsys.readouterr()
    assert _finetune([toy, "--out", out, *args]) == 0
    assert "resuming at epoch 3" in capsys.readouterr().out
    assert [r["epoch"] for r in _manifest(out)["curves"]] == [1, 2, 3, 4]
    # Same inputs and process layout, same seeds per epoch, the optimizer's momentum and the
    # schedule restored: bit for bit the same.
    mine, theirs = _weights(from_pool5[0]), _weights(out)
    assert all(torch.equal(theirs[name], mine[name]) for name in mine)
    # Rerunning a finished run does nothing; other settings are refused, naming them.
    assert _finetune([toy, "--out", out, *args]) == 0
    assert "already complete" in capsys.readouterr().out
    assert _finetune([toy, "--out", out, *args, "--lr", "0.1"]) == 1
    assert "--lr 0.02 (now 0.1)" in capsys.readouterr().err


def test_the_pool5_path_gives_the_weights_of_the_image_path(pool5, from_pool5, one_worker):
    out, printed = from_pool5
    assert f"path: embeddings (pool5 from {pool5}; convolutions frozen, no augmentation)" in (
        printed)
    assert _manifest(out)["path"]["taken"] == "embeddings"
    # Not bit-equal: fc7 extract ran the convolutions on its own batches in channels-last
    # layout, the image path on each step's slice; pool5 agrees to about 1e-6 relative, and
    # four epochs of SGD on it stay within 1e-5.
    mine, theirs = _weights(one_worker), _weights(out)
    for name in mine:
        torch.testing.assert_close(theirs[name], mine[name], rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused_naming_them(toy, pool5, tmp_path, capsys):
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    for j in range(4):
        (one / "only" / f"{j}.jpg").write_bytes(jpeg_bytes(j))
    with pytest.raises(SourceError, match=f"{one}: one class \\(only\\)"):
        finetune([str(one), "--out", str(tmp_path / "a"), "--weights", "random:0"])
    with pytest.raises(ProvenanceMismatch, match=f"--embeddings {pool5}.*weights_sha256"):
        finetune([str(toy), "--out", str(tmp_path / "b"), "--weights", "random:1",
                  "--embeddings", str(pool5)])
    fc7 = tmp_path / "fc7"
    assert extract([str(toy), "--out", str(fc7), "--weights", "random:0", "--layer", "fc7",
                    "--runner", "local"]) == 0
    with pytest.raises(ProvenanceMismatch, match=f"--embeddings {fc7}.*layer fc7, not pool5"):
        finetune([str(toy), "--out", str(tmp_path / "c"), "--weights", "random:0",
                  "--embeddings", str(fc7)])
    with pytest.raises(ConfigError, match="--freeze fc6 --model resnet50.*no fc6"):
        finetune([str(toy), "--out", str(tmp_path / "d"), "--model", "resnet50",
                  "--freeze", "fc6"])
    with pytest.raises(ConfigError, match="--augment light needs the images"):
        finetune([str(toy), "--out", str(tmp_path / "e"), "--path", "embeddings",
                  "--augment", "light", "--embeddings", str(pool5)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_path_is_chosen_and_explained():
    from pipeline.finetune import choose_path

    def config(**changes) -> FinetuneConfig:
        return FinetuneConfig(data="d", out="o", **changes)

    assert choose_path(config(embeddings="e")) == (
        "embeddings", "pool5 from e; convolutions frozen, no augmentation")
    assert choose_path(config(embeddings="e", augment="light")) == (
        "images", "--augment light needs the images")
    assert choose_path(config(embeddings="e", freeze="none"))[0] == "images"
    assert choose_path(config())[1].startswith("no --embeddings given")


def test_the_bundled_config_is_valid_and_flags_override_it():
    from pipeline.config import parse_config

    config = parse_config(FinetuneConfig, ["--config", str(REPO / "configs/finetune.yaml"),
                                           "--lr", "0.1"], "fc7 finetune", "")
    assert (config.model, config.freeze, config.lr, config.epochs) == ("alexnet", "features",
                                                                      0.1, 10)


def test_unreadable_images_are_skipped_counted_and_named(toy, tmp_path):
    from pipeline.finetune import load_data
    from pipeline.model import load_weights
    from pipeline.provenance import preprocessing_for

    source = tmp_path / "images"
    for label in CLASSES:
        (source / label).mkdir(parents=True)
        for j in range(3):
            (source / label / f"{j}.jpg").write_bytes(toy_jpeg(label, j))
    (source / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    data, images = load_data(str(source), "images", load_weights("random:0"),
                             preprocessing_for("alexnet"), 0.3, seed=0)
    assert [skipped[0] for skipped in data.skipped] == ["red/broken.jpg"]
    assert images.shape == (6, 3, 224, 224) and images.dtype == np.uint8
    assert (len(data.train), len(data.val)) == (4, 2)
    assert sorted(data.labels[data.val].tolist()) == [0, 1]  # stratified


def test_a_standardized_layer_folds_back_into_the_same_plain_function():
    """`--standardize`: the first trained layer starts as the base function in standardized
    coordinates, and whatever training makes of it folds back into plain weights (model.pt)
    that compute the same outputs."""
    from pipeline.finetune.train import Standardized, plain_state_dict, to_standardized

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 6, generator=generator) * 0.02 + 0.01  # tiny, as random pool5 is
    mean, std = x.mean(0), x.std(0)
    linear, plain = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    plain.load_state_dict(linear.state_dict())
    to_standardized(linear, mean, std)
    wrapped = Standardized(linear, mean, std)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), plain(x), rtol=1e-5, atol=1e-6)
        linear.weight.add_(torch.randn(4, 6, generator=generator))  # what training does
        linear.bias.add_(1.0)
        state = {"model": {"fc.weight": linear.weight.clone(), "fc.bias": linear.bias.clone()},
                 "standardized": {"layer": "fc", "mean": mean, "std": std}}
        folded = plain_state_dict(state)
        plain.load_state_dict({"weight": folded["fc.weight"], "bias": folded["fc.bias"]})
        torch.testing.assert_close(plain(x), wrapped(x), rtol=1e-4, atol=1e-5)


def test_weights_that_do_not_fit_ray_s_object_store_end_the_run_in_one_line(toy, tmp_path):
    from ray._private.utils import estimate_available_memory

    # A local Ray store of about 150 MB (Ray takes this share of the memory it finds available;
    # its least is 75 MB) and no spilling (conftest: as on a 97%-full disk): AlexNet's weights
    # (244 MB) cannot be put. Ray's own message blames "the local disk" and nothing else.
    share = 150_000_000 / estimate_available_memory()
    env = dict(os.environ, RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION=f"{share:.6f}")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "finetune", str(toy), "--out", str(tmp_path / "out"),
         *COMMON, "--num-workers", "1"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fc7 finetune: error: Ray's object store is full and it may not "
                           "spill to disk: the disk of Ray's temp folder"), done.stderr[-3000:]
    assert "--object-store-memory" in last and "Traceback" not in done.stderr
