"""Model zoo: name -> builder(input_shape, num_classes) -> torch.nn.Module.

Builders import torch themselves, so listing the zoo stays cheap.
"""

from prune2tvm.registry import Registry

MODELS = Registry("model")

from prune2tvm.models import classic, imagenet, small, transformer  # noqa: E402,F401

__all__ = ["MODELS", "build_model"]


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int):
    return MODELS.lookup(name)(input_shape=tuple(input_shape), num_classes=num_classes)
