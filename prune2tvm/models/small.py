"""Small models for the embedded digits data (they take any [C, H, W] input)."""

from __future__ import annotations

from prune2tvm.models import MODELS


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int):
    """Flatten -> 256 -> 128 -> classes, ReLU between."""
    import math

    from torch import nn

    features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


@MODELS.register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int):
    """Two 3x3 conv+BN+ReLU blocks, 2x2 max-pool, then a 2-layer classifier."""
    from torch import nn

    channels, height, width = input_shape
    if height < 2 or width < 2:
        raise ValueError(f"cnn needs inputs of at least 2x2 pixels, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 2) * (width // 2), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )
