"""The classic pruning benchmarks' models: LeNet-300-100, LeNet-5 (MNIST-sized inputs),
ResNet-20/56 for CIFAR (He et al. 2016, section 4.2), MobileNet V1 (Howard et al.).

ResNet-20/56 use projection shortcuts (1x1 conv + BN) where the shape changes, the
paper's option B; option A's zero-padded identity has no weights to prune or thin.
"""

from __future__ import annotations

from prune2tvm.models import MODELS


@MODELS.register("lenet_300_100")
def lenet_300_100(input_shape: tuple[int, ...], num_classes: int):
    """Flatten -> 300 -> 100 -> classes (LeCun et al.; Han et al.'s pruning benchmark)."""
    import math

    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 300), nn.ReLU(),
                         nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, num_classes))


@MODELS.register("lenet5")
def lenet5(input_shape: tuple[int, ...], num_classes: int):
    """Conv 5x5 (20) -> pool -> conv 5x5 (50) -> pool -> 500 -> classes (Caffe's LeNet-5,
    unpadded: 28x28 MNIST gives 50x4x4 features; inputs of at least 16x16)."""
    from torch import nn

    channels, height, width = input_shape
    side = lambda n: ((n - 4) // 2 - 4) // 2  # noqa: E731
    if side(height) < 1 or side(width) < 1:
        raise ValueError(f"lenet5 needs inputs of at least 16x16 pixels, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(50 * side(height) * side(width), 500), nn.ReLU(), nn.Linear(500, num_classes))


def _cifar_resnet(depth: int, num_classes: int, in_channels: int):
    from torch import nn

    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth {depth} is not 6n + 2")
    n = (depth - 2) // 6

    class Block(nn.Module):
        def __init__(self, inp, out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(out)
            self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out)
            self.shortcut = None
            if stride != 1 or inp != out:
                self.shortcut = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

        def forward(self, x):
            identity = x if self.shortcut is None else self.shortcut(x)
            y = nn.functional.relu(self.bn1(self.conv1(x)))
            return nn.functional.relu(self.bn2(self.conv2(y)) + identity)

    class CifarResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            stages, inp = [], 16
            for out, stride in ((16, 1), (32, 2), (64, 2)):
                stages.append(nn.Sequential(*[Block(inp if i == 0 else out, out, stride if i == 0 else 1)
                                              for i in range(n)]))
                inp = out
            self.layer1, self.layer2, self.layer3 = stages
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            x = nn.functional.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(x.mean((2, 3)))

    return CifarResNet()


@MODELS.register("resnet20")
def resnet20(input_shape: tuple[int, ...], num_classes: int):
    """ResNet-20 for CIFAR-10 (32x32): 3 stages of 3 basic blocks, 16/32/64 channels."""
    return _cifar_resnet(20, num_classes, input_shape[0])


@MODELS.register("resnet56")
def resnet56(input_shape: tuple[int, ...], num_classes: int):
    """ResNet-56 for CIFAR-10 (32x32): 3 stages of 9 basic blocks, 16/32/64 channels."""
    return _cifar_resnet(56, num_classes, input_shape[0])


@MODELS.register("mobilenet_v1")
def mobilenet_v1(input_shape: tuple[int, ...], num_classes: int):
    """MobileNet V1 (Howard et al.), width 1.0: depthwise-separable convs, 224x224 real size."""
    from torch import nn

    def conv_bn(inp, out, kernel, stride, groups=1):
        return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(out), nn.ReLU(inplace=True))

    layers = [conv_bn(input_shape[0], 32, 3, 2)]
    inp = 32
    for out, stride in ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
                        (512, 1), (512, 1), (1024, 2), (1024, 1)):
        layers += [conv_bn(inp, inp, 3, stride, groups=inp), conv_bn(inp, out, 1, 1)]
        inp = out

    class MobileNetV1(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(1024, num_classes)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    return MobileNetV1()
