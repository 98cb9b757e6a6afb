"""Classify image files end to end with a fine-tuned network (`fc7 predict DIR --image ...`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.classify.predict import ImagePrediction
from pipeline.decode import ImageDecodeError, decode_image
from pipeline.errors import ArtifactError, SourceError
from pipeline.finetune.output import MANIFEST_FILE, MODEL_FILE, SCHEMA_VERSION
from pipeline.model import FINETUNE_KIND, full_network, load_weights, resolve_device
from pipeline.provenance import Preprocessing, check_schema_version
from pipeline.sources import read_image_bytes


def is_finetune_dir(folder: str | Path) -> bool:
    """Whether `folder` holds a fine-tune (manifest.json of kind fc7.finetune)."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == FINETUNE_KIND


@dataclass(eq=False)
class FinetunedModel:
    """A fine-tuned network, loaded and verified against its manifest.

    Example:
        >>> model = FinetunedModel.load("out/finetune")            # doctest: +SKIP
        >>> model.predict_files(["cat.jpg"], k=2)[0].top           # doctest: +SKIP
        [('cat', 0.93), ('dog', 0.07)]
    """

    network: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    manifest: dict[str, Any]
    device: torch.device

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> FinetunedModel:
        """Load `folder`'s model.pt, checked against manifest.json.

        Raises:
            ArtifactError: no fine-tune manifest, a newer schema, or a model.pt that is not
                the one the manifest names (sha256) or has another number of classes.
            WeightsError: model.pt unreadable.
        """
        folder = Path(folder)
        where = folder / MANIFEST_FILE
        try:
            manifest = json.loads(where.read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{where}: not a readable fine-tune manifest ({err})") from err
        if not isinstance(manifest, dict) or manifest.get("kind") != FINETUNE_KIND:
            raise ArtifactError(f"{where}: not written by fc7 finetune")
        check_schema_version(manifest.get("schema_version"), SCHEMA_VERSION, str(where),
                             "fine-tune again")
        # load_weights checks model.pt's sha256 against this manifest (the weights chain).
        weights = load_weights(str(folder / MODEL_FILE), manifest["model"])
        classes = list(manifest["classes"])
        if weights.num_classes != len(classes):
            raise ArtifactError(
                f"{folder / MODEL_FILE}: a head of {weights.num_classes} classes, the manifest "
                f"names {len(classes)}; fine-tune again"
            )
        resolved = resolve_device(device)
        network = full_network(weights).to(resolved)
        preprocessing = Preprocessing.model_validate(manifest["preprocessing"])
        return cls(network, classes, preprocessing, manifest, resolved)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes of a (batch, 3, crop, crop) uint8 batch."""
        shape = (1, 3, 1, 1)
        mean = torch.tensor(self.preprocessing.mean).view(shape)
        std = torch.tensor(self.preprocessing.std).view(shape)
        x = images.float().mul_(1 / (255 * std)).add_(-mean / std).to(self.device)
        return torch.softmax(self.network(x).float(), dim=1).cpu()

    def predict_files(self, paths: list[str], k: int = 5) -> list[ImagePrediction]:
        """Read, decode and classify image files, one result per path (top-k labels with
        their probabilities), a file that cannot be read or decoded being a result with an
        `error`, unless it is the only one given.

        Raises:
            SourceError: the only path given cannot be read or decoded.
        """
        decoded: dict[int, torch.Tensor] = {}
        errors: dict[int, str] = {}
        for i, path in enumerate(paths):
            try:
                decoded[i] = decode_image(read_image_bytes(path), self.preprocessing)[0]
            except OSError as err:
                errors[i] = f"cannot read: {getattr(err, 'strerror', None) or err}"
            except ImageDecodeError as err:
                errors[i] = str(err)
        if len(paths) == 1 and errors:
            raise SourceError(f"--image {paths[0]}: {errors[0]}")
        results = [ImagePrediction(path, None, errors.get(i)) for i, path in enumerate(paths)]
        if decoded:
            rows = sorted(decoded)
            probabilities = self.probabilities(torch.stack([decoded[i] for i in rows]))
            scores, best = probabilities.topk(min(k, len(self.classes)), dim=1)
            for row, i in enumerate(rows):
                results[i].top = [
                    (self.classes[c], float(s))
                    for c, s in zip(best[row].tolist(), scores[row].tolist(), strict=True)
                ]
        return results
