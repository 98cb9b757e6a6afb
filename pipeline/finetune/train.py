"""The training loop, run by every Ray Train worker (DDP), and the driver side that starts it.

`--batch-size` is the global batch: each epoch, every worker draws the same permutation of the
training split (seeded by seed and epoch), cuts it into global batches and takes its own
contiguous 1/N slice of each. The loss of a slice is its summed cross-entropy times N over the
global batch size, so once DDP has averaged the gradients over the N workers they are the
gradients of the mean loss over the global batch, whatever N is. Reported losses and accuracies
are summed over workers (all-reduce) before they are divided.

With frozen convolutions the first trained Linear layer (fc6, or the head of a network whose
pooled features feed it directly) is trained on standardized inputs (`--standardize`: centred
per feature, divided by one scale, see `_input_statistics`): its
parameters live in that space during training and are folded back (`plain_state_dict`) into a
plain torchvision state dict for model.pt. At the start it computes the same function as the
base weights; only the optimisation's scale changes. Random AlexNet's pool5 values are about
0.02 and nearly the same for every image: on them SGD left the loss at ln(classes).

Randomness is re-seeded at the start of every epoch from (seed, epoch, rank), and augmentation
per sample from (seed, epoch, sample), so a run resumed from epoch N's checkpoint continues
exactly as the uninterrupted run did.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones import backbone
from pipeline.finetune.config import FinetuneConfig
from pipeline.provenance import Preprocessing

CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"epoch-(\d{3,})\.pt")
CHECKPOINT_SCHEMA = 1


@dataclass
class TrainJob:
    """What every worker needs: the options, the split, and the data in the object store.

    `inputs` holds uint8 images (N, 3, crop, crop) on the images path, or float32 pooled
    embeddings (N, width) on the embeddings path; `base` the base weights' state dict. Both are
    ObjectRefs in the object store when workers are Ray actors, the objects themselves with
    `--num-workers 0`. `train` and `val` index them; `labels` are class indices.
    """

    config: FinetuneConfig
    classes: list[str]
    labels: np.ndarray
    train: np.ndarray
    val: np.ndarray
    path: str
    inputs: Any
    base: Any
    preprocessing: Preprocessing
    checkpoints: str
    key: dict[str, Any]


class Standardized(nn.Module):
    """`linear` applied to `(x - mean) / std`: see the module docstring."""

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


def to_standardized(linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Re-express `linear`'s weights, in place, for standardized inputs: W x + b equals
    (W std)((x - mean) / std) + (b + W mean)."""
    with torch.no_grad():
        linear.bias += linear.weight @ mean
        linear.weight *= std


def plain_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's network as a plain torchvision state dict: a standardized layer's
    weights folded back, V((x - mean) / std) + c = (V / std) x + (c - (V / std) mean)."""
    model = dict(state["model"])
    standardized = state.get("standardized")
    if standardized:
        name, mean, std = standardized["layer"], standardized["mean"], standardized["std"]
        weight = model[f"{name}.weight"] / std
        model[f"{name}.weight"] = weight
        model[f"{name}.bias"] = model[f"{name}.bias"] - weight @ mean
    return model


def seed_of(*parts: object) -> int:
    """A 63-bit seed from any parts: `seed_of(seed, epoch, rank)`."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def stage_file(path: Path, write) -> None:
    """Write through `write(temporary)` and move into place: a kill leaves no half file."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def checkpoint_path(folder: str | Path, epoch: int) -> Path:
    return Path(folder) / f"epoch-{epoch:03d}.pt"


def latest_checkpoint(folder: str | Path) -> tuple[int, Path] | None:
    """(epoch, path) of the newest complete checkpoint in `folder`, or None."""
    found = [
        (int(match.group(1)), path)
        for path in Path(folder).glob("epoch-*.pt")
        if (match := CHECKPOINT_NAME.fullmatch(path.name))
    ]
    return max(found) if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, tensors on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def fit(job: TrainJob, storage: str) -> None:
    """Train on Ray Train: `--num-workers` workers, a GPU each when asked for.

    Every epoch's checkpoint lands in `job.checkpoints`; the caller reads the result there.

    Raises:
        ray.train.TrainingFailedError: a worker failed more than `--max-failures` times.
    """
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = job.config
    # --num-workers 0 is Ray Train's local mode: the loop runs in this process, no actors.
    use_gpu = config.num_workers > 0 and (config.device == "cuda" or (
        config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
    ))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"fc7-finetune-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.max_failures),
            # Not a line per report, worker move and process group: our epoch lines say it.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()


def augmentation(kind: str, crop: int) -> nn.Module | None:
    """The training transform of uint8 (3, crop, crop) images for `--augment`."""
    if kind == "none":
        return None
    from torchvision.transforms import v2

    steps: list[nn.Module] = [
        v2.RandomResizedCrop(crop, scale=(0.6 if kind == "light" else 0.3, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if kind == "strong":
        steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05))
    return v2.Compose(steps)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p.rstrip(".") + ".") for p in prefixes)


def new_network(job: TrainJob, base: dict[str, torch.Tensor]) -> nn.Module:
    """The base weights with a new head of `len(job.classes)`, seeded, dropout set, frozen
    parameters marked."""
    config = job.config
    model = backbone(config.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(config.seed, "head"))
        network = model.build(num_classes=len(job.classes))
    kept = {name: value for name, value in base.items() if not _under(name, (model.head,))}
    network.load_state_dict(kept, strict=False)
    for module in network.modules():
        if isinstance(module, nn.Dropout):
            module.p = config.dropout
    frozen = model.frozen_prefixes(config.freeze)
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(not _under(name, frozen))
    return network


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker's training loop (see the module docstring).

    With `--num-workers 0` this runs in the caller's process, whose random state and
    determinism setting are left as they were.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.use_deterministic_algorithms(True, warn_only=True)
            _train(loop_config["job"])
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(job: TrainJob) -> None:
    import ray
    import ray.train
    import ray.train.torch

    config = job.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    inputs, base = (ray.get(x) if isinstance(x, ray.ObjectRef) else x
                    for x in (job.inputs, job.base))
    network = new_network(job, base)
    del base
    model = backbone(config.model)

    found = latest_checkpoint(job.checkpoints)
    state = load_checkpoint(found[1]) if found else None
    if state is not None:
        network.load_state_dict(state["model"])

    # Frozen convolutions run in eval mode without gradients; only the rest is trained (and
    # wrapped in DDP). From embeddings, the trunk is not run at all.
    trunk = None
    if config.freeze != "none":
        trainable = model.rest(network, model.pooled)
        if job.path == "images":
            trunk = model.cut(network, model.pooled).to(device).eval()
    else:
        trainable = network
    mean = torch.tensor(job.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(job.preprocessing.std).view(1, 3, 1, 1)
    scale, shift = (1 / (255 * std)).to(device), (-mean / std).to(device)
    augment = augmentation(config.augment, job.preprocessing.crop)
    labels = torch.from_numpy(np.array(job.labels))

    def batch(indices: np.ndarray, epoch: int, training: bool) -> torch.Tensor:
        if job.path == "embeddings":
            return torch.from_numpy(inputs[indices]).to(device)
        images = torch.from_numpy(inputs[indices])
        if training and augment is not None:
            images = _augmented(images, indices, augment, config.seed, epoch)
        # As `pipeline.model.Embedder` normalises: one multiply-add on the 0..255 values.
        x = images.to(device).float().mul_(scale).add_(shift)
        if trunk is None:
            return x
        with torch.no_grad():
            return trunk(x)

    def summed(tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the workers."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tensor)
        return tensor

    def all_reduced(values: list[float]) -> list[float]:
        return summed(torch.tensor(values, dtype=torch.float64, device=device)).tolist()

    standardized = None
    if config.standardize and config.freeze != "none":
        linear = next(module for module in trainable.modules()
                      if isinstance(module, nn.Linear) and module.weight.requires_grad)
        if state is not None and state.get("standardized"):
            standardized = state["standardized"]  # the checkpoint's weights are in its space
        else:
            feature_mean, feature_std = _input_statistics(
                batch, job.train, world, rank, config.batch_size, summed
            )
            layer = next(name for name, module in network.named_modules() if module is linear)
            standardized = {"layer": layer, "mean": feature_mean, "std": feature_std}
            to_standardized(linear, feature_mean.to(device), feature_std.to(device))
        position = next(i for i, module in enumerate(trainable) if module is linear)
        trainable[position] = Standardized(linear, standardized["mean"].to(device),
                                           standardized["std"].to(device))

    trainable = ray.train.torch.prepare_model(trainable)
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    progress = {"curves": [], "best_epoch": 0, "best_val_loss": float("inf"), "bad_epochs": 0}
    start = 1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = {key: state[key] for key in progress}
        # A finished run killed before its outputs were written has nothing left to train.
        start = config.epochs + 1 if state["finished"] else state["epoch"] + 1
        del state

    for epoch in range(start, config.epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(seed_of(config.seed, epoch, rank))  # dropout
        order = torch.randperm(
            len(job.train), generator=torch.Generator().manual_seed(seed_of(config.seed, epoch))
        ).numpy()
        shuffled = job.train[order]
        lr = optimizer.param_groups[0]["lr"]
        trainable.train()
        sums = [0.0, 0.0, 0.0]  # summed loss, correct, samples
        for at in range(0, len(shuffled), config.batch_size):
            global_batch = shuffled[at : at + config.batch_size]
            mine = np.array_split(global_batch, world)[rank]
            logits = trainable(batch(mine, epoch, training=True))
            target = labels[mine].to(device)
            loss = F.cross_entropy(logits, target, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            (loss * world / len(global_batch)).backward()
            optimizer.step()
            sums[0] += loss.item()
            sums[1] += (logits.argmax(1) == target).sum().item()
            sums[2] += len(mine)
        train_loss, train_correct, train_seen = all_reduced(sums)
        val_loss, val_correct, val_seen = all_reduced(
            # A copy: the split came through the object store read-only, and torch warns
            # when indexed with a read-only array.
            _evaluate(trainable, batch, labels, np.array_split(job.val, world)[rank].copy(),
                      config.batch_size, device)
        )
        scheduler.step()
        row = {
            "epoch": epoch,
            "train_loss": train_loss / train_seen,
            "train_accuracy": train_correct / train_seen,
            "val_loss": val_loss / val_seen,
            "val_accuracy": val_correct / val_seen,
            "seconds": round(time.perf_counter() - started, 3),
            "lr": lr,
        }
        progress["curves"].append(row)
        if row["val_loss"] < progress["best_val_loss"]:
            progress.update(best_epoch=epoch, best_val_loss=row["val_loss"], bad_epochs=0)
        else:
            progress["bad_epochs"] += 1
        stopped_early = progress["bad_epochs"] >= config.patience and epoch < config.epochs
        if rank == 0:
            _save_checkpoint(job, network, optimizer, scheduler, epoch, progress,
                             finished=stopped_early or epoch == config.epochs,
                             stopped_early=stopped_early, standardized=standardized)
            # Written, not print()ed: Ray Train's workers send print() to a logger that also
            # echoes it, and each epoch line reached the driver twice.
            sys.stdout.write(
                f"epoch {epoch}/{config.epochs}: train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.3f}, val loss {row['val_loss']:.4f} "
                f"acc {row['val_accuracy']:.3f}, lr {lr:.3g}, {row['seconds']:.1f} s"
                + (" (best)" if progress["best_epoch"] == epoch else "") + "\n"
            )
            sys.stdout.flush()
        ray.train.report({key: value for key, value in row.items()})
        if stopped_early:
            break


def _input_statistics(
    batch, train: np.ndarray, world: int, rank: int, size: int, summed,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained layers' input over the training split (each worker sums its slice, in
    float64): its mean per feature, and one scale for all features, the root of their mean
    variance (as a vector of that value).

    One scale rather than a std per feature: a nearly constant feature's std is tiny, and
    dividing by it would blow up differences of 1e-6 (how two runs of the same convolutions
    differ) into different training."""
    mine = np.array_split(train, world)[rank]
    first = batch(train[:1], 0, training=False)
    totals = torch.zeros(2, first.shape[1], dtype=torch.float64, device=first.device)
    for at in range(0, len(mine), size):
        features = batch(mine[at : at + size], 0, training=False).double()
        totals += torch.stack([features.sum(0), (features * features).sum(0)])
    totals = summed(totals).cpu()
    mean = totals[0] / len(train)
    scale = (totals[1] / len(train) - mean * mean).clamp_min(0).mean().sqrt().item()
    std = torch.full_like(mean, scale if scale > 1e-12 else 1.0)  # 1: every feature constant
    return mean.float(), std.float()


def _augmented(
    images: torch.Tensor, indices: np.ndarray, augment: nn.Module, seed: int, epoch: int
) -> torch.Tensor:
    # Seeded per sample, not per worker: the same image gets the same crop whichever worker
    # takes it, so the worker count does not change what is trained on.
    out = []
    for image, index in zip(images, indices, strict=True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(seed, epoch, "augment", int(index)))
            out.append(augment(image))
    return torch.stack(out) if out else images


@torch.no_grad()
def _evaluate(
    trainable: nn.Module, batch, labels: torch.Tensor, indices: np.ndarray, size: int,
    device: torch.device,
) -> list[float]:
    trainable.eval()
    sums = [0.0, 0.0, float(len(indices))]
    for at in range(0, len(indices), size):
        part = indices[at : at + size]
        logits = trainable(batch(part, 0, training=False))
        target = labels[part].to(device)
        sums[0] += F.cross_entropy(logits, target, reduction="sum").item()
        sums[1] += (logits.argmax(1) == target).sum().item()
    return sums


def _save_checkpoint(
    job: TrainJob, network: nn.Module, optimizer, scheduler, epoch: int,
    progress: dict[str, Any], finished: bool, stopped_early: bool,
    standardized: dict[str, Any] | None,
) -> None:
    """Write epoch `epoch`'s checkpoint atomically, then delete those no longer needed (all
    but this one and the best epoch's, whose model is the one written in the end)."""
    folder = Path(job.checkpoints)
    path = checkpoint_path(folder, epoch)
    state = {
        "schema_version": CHECKPOINT_SCHEMA,
        "key": job.key,
        "epoch": epoch,
        "model": {name: value.cpu() for name, value in network.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "finished": finished,
        "stopped_early": stopped_early,
        "standardized": standardized,
        **progress,
    }
    stage_file(path, lambda temporary: torch.save(state, temporary))
    keep = {path.name, checkpoint_path(folder, progress["best_epoch"]).name}
    for old in folder.glob("epoch-*.pt"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
