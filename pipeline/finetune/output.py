"""The fine-tune folder: checked before training (resume, refuse, or start again), written after.

A fine-tune folder holds:

- `model.pt`: a plain torchvision state dict of the whole network with its new head (the best
  epoch's weights), loadable by `torchvision.models.<model>(num_classes=...)`, and by
  `fc7 extract --weights DIR/model.pt`;
- `manifest.json`: kind "fc7.finetune", the base weights and their chain, model.pt's sha256,
  the classes in head order, the data's fingerprint, the hyper-parameters, the path taken, the
  per-epoch curves, the best epoch, versions;
- `curves.png`: loss and accuracy per epoch;
- while training: `checkpoints/` (`run.json`, then `epoch-NNN.pt` every epoch) and `.ray-train/`
  (Ray Train's run folder).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision

from pipeline import __version__
from pipeline.errors import OutputError
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.data import LabelledData
from pipeline.finetune.train import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    plain_state_dict,
    stage_file,
)
from pipeline.model import FINETUNE_KIND, Weights
from pipeline.provenance import Preprocessing, file_sha256
from pipeline.store import describe_entries

SCHEMA_VERSION = 1
MODEL_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"
CURVES_FILE = "curves.png"
RUN_FILE = "run.json"
RAY_STORAGE = ".ray-train"
OURS = frozenset({MODEL_FILE, MANIFEST_FILE, CURVES_FILE, CHECKPOINTS, RAY_STORAGE})


@dataclass
class OutputState:
    """What `--out` holds for this run: nothing yet, a run to resume, or a finished run."""

    complete: bool = False
    resume_epoch: int | None = None


def run_key(config: FinetuneConfig, data: LabelledData, weights: Weights) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (JSON-comparable)."""
    return json.loads(json.dumps({
        "hyperparameters": config.hyperparameters(),
        "base_weights_sha256": weights.sha256,
        "classes": data.classes,
        "data": data.fingerprint(),
    }))


def prepare_output(out: Path, key: dict[str, Any], overwrite: bool) -> OutputState:
    """Make `out` ready: new, resumable (same key), finished (same key), or refused.

    Raises:
        OutputError: `out` holds what fc7 finetune did not write, or a fine-tune made with
            other options or data (the message lists them) and `overwrite` is off.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        names = sorted(entry.name for entry in out.iterdir())
    except OSError as err:
        raise OutputError(f"--out {out}: cannot create or list: {err.strerror or err}") from err
    foreign = [name for name in names if name not in OURS and not _is_leftover(name)]
    if foreign:
        raise OutputError(
            f"--out {out}: holds what fc7 finetune did not write ({describe_entries(foreign)});"
            f" choose a new or empty folder"
        )
    previous = _previous_key(out)
    if previous is not None and (overwrite or previous != key):
        if not overwrite:
            raise OutputError(
                f"--out {out}: holds a fine-tune made with other "
                f"{'; '.join(key_differences(previous, key))}; run its own command again to "
                f"resume it, choose another --out, or pass --overwrite to start again"
            )
        clear(out)
    if (out / MANIFEST_FILE).is_file():
        return OutputState(complete=True)
    checkpoints = out / CHECKPOINTS
    checkpoints.mkdir(exist_ok=True)
    for leftover in [*out.glob(".*.tmp"), *checkpoints.glob(".*.tmp")]:
        leftover.unlink(missing_ok=True)  # a killed run's half-written file
    if not (checkpoints / RUN_FILE).is_file():
        _write_text(checkpoints / RUN_FILE, json.dumps(key, indent=2))
    found = latest_checkpoint(checkpoints)
    return OutputState(resume_epoch=found[0] + 1 if found else None)


def key_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How two run keys differ, as a user reads it: `--lr 0.01 (now 0.1)`."""
    diffs = []
    before, now = old.get("hyperparameters", {}), new.get("hyperparameters", {})
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            diffs.append(f"--{name.replace('_', '-')} {before.get(name)} (now {now.get(name)})")
    if old.get("base_weights_sha256") != new.get("base_weights_sha256"):
        diffs.append("base weights (their sha256 differs)")
    if old.get("classes") != new.get("classes"):
        diffs.append(f"classes {old.get('classes')} (now {new.get('classes')})")
    elif old.get("data") != new.get("data"):
        diffs.append("data (the images, their labels or the validation split differ)")
    return diffs or ["settings"]


def clear(out: Path) -> None:
    """Delete what fc7 finetune wrote in `out`, and nothing else."""
    for name in OURS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for leftover in out.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def finished_state(out: Path) -> dict[str, Any] | None:
    """The last checkpoint's contents if its run is finished (so only the outputs are left to
    write), else None."""
    found = latest_checkpoint(out / CHECKPOINTS)
    if found is None:
        return None
    state = load_checkpoint(found[1])
    return state if state["finished"] else None


def write_outputs(
    out: Path,
    config: FinetuneConfig,
    data: LabelledData,
    weights: Weights,
    preprocessing: Preprocessing,
    path: tuple[str, str],
    key: dict[str, Any],
) -> dict[str, Any]:
    """Write curves.png, model.pt (the best epoch's network) and, last, manifest.json from the
    checkpoints of a finished run; each is staged and moved into place.

    Returns:
        The manifest.

    Raises:
        OutputError: the run in `out` is not finished.
    """
    last = finished_state(out)
    if last is None:
        raise OutputError(f"--out {out}: the training did not finish; run the command again")
    best_epoch = last["best_epoch"]
    best = last if best_epoch == last["epoch"] else load_checkpoint(
        out / CHECKPOINTS / f"epoch-{best_epoch:03d}.pt"
    )
    curves = last["curves"]
    _plot_curves(curves, best_epoch, out / CURVES_FILE)
    model = plain_state_dict(best)
    stage_file(out / MODEL_FILE, lambda temporary: torch.save(model, temporary))
    manifest = {
        "kind": FINETUNE_KIND,
        "schema_version": SCHEMA_VERSION,
        "model": config.model,
        "base_weights": {"weights": weights.spec, "sha256": weights.sha256,
                         "chain": [dict(item) for item in weights.chain]},
        "model_file": MODEL_FILE,
        "model_sha256": file_sha256(out / MODEL_FILE),
        "classes": data.classes,
        "preprocessing": preprocessing.model_dump(),
        "data": {
            "source": data.source,
            **data.fingerprint(),
            "skipped": len(data.skipped),
            "skipped_examples": [{"id": i, "error": e} for i, e in data.skipped[:20]],
        },
        "hyperparameters": key["hyperparameters"],
        "num_workers": config.num_workers,
        "path": {"taken": path[0], "why": path[1]},
        "curves": curves,
        "best_epoch": best_epoch,
        "best_val_loss": last["best_val_loss"],
        "epochs_run": last["epoch"],
        "stopped_early": last["stopped_early"],
        "package_version": __version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "resume_key": key,
    }
    _write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2))
    if not config.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(out / RAY_STORAGE, ignore_errors=True)
    return manifest


def _previous_key(out: Path) -> dict[str, Any] | None:
    for path in (out / MANIFEST_FILE, out / CHECKPOINTS / RUN_FILE):
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except ValueError as err:
                raise OutputError(f"{path}: not valid JSON ({err}); pass --overwrite") from err
            return found.get("resume_key", found) if path.name == MANIFEST_FILE else found
    return None


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _write_text(path: Path, text: str) -> None:
    stage_file(path, lambda temporary: temporary.write_text(text + "\n"))


def _plot_curves(curves: list[dict[str, Any]], best_epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in curves]
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric in ((loss, "loss"), (accuracy, "accuracy")):
        axes.plot(epochs, [row[f"train_{metric}"] for row in curves], "o-", label="train")
        axes.plot(epochs, [row[f"val_{metric}"] for row in curves], "o-", label="validation")
        axes.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend()
    figure.tight_layout()
    stage_file(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    plt.close(figure)
