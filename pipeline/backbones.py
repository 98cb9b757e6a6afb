"""The torchvision networks fc7 embeds with, and where each is cut into its named layers.

A `Backbone` knows a network's layers (`pipeline.provenance.MODEL_LAYERS` holds their widths),
how to cut the network after one (`cut`), what runs after it (`rest`: fine-tuning from stored
embeddings), which parameters `--freeze` holds, and its ImageNet weights. AlexNet is the default;
VGG16, ResNet-50 and EfficientNet-B0 are its successors, with their own layers and preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum

from pipeline.errors import ConfigError
from pipeline.provenance import MODEL_LAYERS


@dataclass(frozen=True)
class Backbone:
    """One torchvision classification network and its named layers.

    Attributes:
        name: the `--model` value, torchvision's builder name.
        pooled: the layer where the convolutional trunk ends; fine-tuning with frozen
            convolutions can start from embeddings of this layer.
        head: the state-dict prefix of the last Linear layer, which fine-tuning replaces.
        imagenet: the weights `--weights imagenet` loads.
        builder: torchvision's constructor.
        stages: for each layer, the `(module name, end)` pieces whose output it is: the whole
            child module, or the first `end` modules of a Sequential child.
        frozen: for each `--freeze` choice, the state-dict prefixes it holds fixed.
    """

    name: str
    pooled: str
    head: str
    imagenet: WeightsEnum
    builder: Callable[..., nn.Module]
    stages: dict[str, tuple[tuple[str, int | None], ...]]
    frozen: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers offered, the default first."""
        return tuple(MODEL_LAYERS[self.name])

    def build(self, num_classes: int = 1000) -> nn.Module:
        """torchvision's network with a head of `num_classes`, randomly initialised (build it
        under `torch.device("meta")` when weights will be assigned)."""
        return self.builder(weights=None, num_classes=num_classes)

    def cut(self, network: nn.Module, layer: str) -> nn.Sequential:
        """Images to `layer`'s output, flattened to (batch, width), in eval mode."""
        return nn.Sequential(*self._pieces(network, self.stages[self.check_layer(layer)]),
                             nn.Flatten(1)).eval()

    def rest(self, network: nn.Module, layer: str) -> nn.Sequential:
        """`layer`'s flattened output to the logits: what `cut` leaves out.

        Raises:
            ConfigError: a layer before the global pooling (ResNet-50's layer4), whose
                flattened output the rest of the network cannot take.
        """
        steps = self._after(self.check_layer(layer))
        if any(name == "avgpool" for name, _ in steps):
            raise ConfigError(
                f"{self.name} {layer}: the network can only be continued from {self.pooled} "
                f"or a later layer"
            )
        return nn.Sequential(*self._pieces(network, steps))

    def frozen_prefixes(self, freeze: str) -> tuple[str, ...]:
        """The state-dict prefixes `--freeze FREEZE` holds fixed ("none" holds nothing).

        Raises:
            ConfigError: a choice this network has no layers for (fc6 of ResNet-50).
        """
        if freeze == "none":
            return ()
        if freeze not in self.frozen:
            choices = ", ".join([*self.frozen, "none"])
            raise ConfigError(f"--freeze {freeze}: {self.name} has no {freeze}; use {choices}")
        return self.frozen[freeze]

    def check_layer(self, layer: str) -> str:
        if layer not in MODEL_LAYERS[self.name]:
            raise ConfigError(
                f"--layer {layer}: {self.name} offers {', '.join(self.layers)}"
            )
        return layer

    def _after(self, layer: str) -> list[tuple[str, int | None]]:
        """The pieces that follow `layer` up to the logits."""
        whole = self.stages["logits"]
        done = dict(self.stages[layer])
        steps = []
        for name, end in whole:
            if name not in done:
                steps.append((name, end))
            elif done[name] is not None and done[name] != end:
                steps.append((name, -done[name]))  # a negative end: from there to `end`
        return steps

    @staticmethod
    def _pieces(network: nn.Module, steps) -> list[nn.Module]:
        pieces = []
        for name, end in steps:
            module = network.get_submodule(name)
            if end is None:
                pieces.append(module)
                if name == "avgpool":  # as the networks' forward() does before the classifier
                    pieces.append(nn.Flatten(1))
            elif end >= 0:
                pieces.extend(list(module)[:end])
            else:
                pieces.extend(list(module)[-end:])
        return pieces


BACKBONES: dict[str, Backbone] = {
    "alexnet": Backbone(
        "alexnet", pooled="pool5", head="classifier.6",
        imagenet=models.AlexNet_Weights.IMAGENET1K_V1, builder=models.alexnet,
        stages={
            "fc7": (("features", None), ("avgpool", None), ("classifier", 6)),
            "fc6": (("features", None), ("avgpool", None), ("classifier", 3)),
            "pool5": (("features", None), ("avgpool", None)),
            "logits": (("features", None), ("avgpool", None), ("classifier", 7)),
        },
        frozen={"features": ("features.",), "fc6": ("features.", "classifier.1.")},
    ),
    "vgg16": Backbone(
        "vgg16", pooled="pool5", head="classifier.6",
        imagenet=models.VGG16_Weights.IMAGENET1K_V1, builder=models.vgg16,
        stages={
            "fc7": (("features", None), ("avgpool", None), ("classifier", 5)),
            "fc6": (("features", None), ("avgpool", None), ("classifier", 2)),
            "pool5": (("features", None), ("avgpool", None)),
            "logits": (("features", None), ("avgpool", None), ("classifier", 7)),
        },
        frozen={"features": ("features.",), "fc6": ("features.", "classifier.0.")},
    ),
    "resnet50": Backbone(
        "resnet50", pooled="avgpool", head="fc",
        imagenet=models.ResNet50_Weights.IMAGENET1K_V2, builder=models.resnet50,
        stages={
            "layer4": tuple((name, None) for name in (
                "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")),
            "avgpool": tuple((name, None) for name in (
                "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                "avgpool")),
            "logits": tuple((name, None) for name in (
                "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                "avgpool", "fc")),
        },
        frozen={"features": ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")},
    ),
    "efficientnet_b0": Backbone(
        "efficientnet_b0", pooled="avgpool", head="classifier.1",
        imagenet=models.EfficientNet_B0_Weights.IMAGENET1K_V1, builder=models.efficientnet_b0,
        stages={
            "avgpool": (("features", None), ("avgpool", None)),
            "logits": (("features", None), ("avgpool", None), ("classifier", None)),
        },
        frozen={"features": ("features.",)},
    ),
}


def backbone(name: str) -> Backbone:
    """The `Backbone` named by `--model`.

    Raises:
        ConfigError: a model fc7 does not offer.
    """
    if name not in BACKBONES:
        raise ConfigError(f"--model {name}: must be one of {', '.join(BACKBONES)}")
    return BACKBONES[name]
