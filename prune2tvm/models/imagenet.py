"""ImageNet-shaped CNNs (defined here: torchvision's C ops need a CUDA torch build).

Layer names follow torchvision's, so a user's torchvision state dict loads as it is.
"""

from __future__ import annotations

from prune2tvm.models import MODELS


def _resnet(layers: list[int], bottleneck: bool, num_classes: int, in_channels: int):
    from torch import nn

    expansion = 4 if bottleneck else 1

    class BasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride, downsample):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class Bottleneck(nn.Module):
        def __init__(self, inplanes, planes, stride, downsample):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    block = Bottleneck if bottleneck else BasicBlock

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._stage(64, layers[0], 1)
            self.layer2 = self._stage(128, layers[1], 2)
            self.layer3 = self._stage(256, layers[2], 2)
            self.layer4 = self._stage(512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * expansion, num_classes)

        def _stage(self, planes, blocks, stride):
            downsample = None
            if stride != 1 or self.inplanes != planes * expansion:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * expansion, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes * expansion))
            stage = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * expansion
            stage += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
            return nn.Sequential(*stage)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet()


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int):
    """ResNet-18 (He et al.), ImageNet layout; any input size of at least 32x32."""
    return _resnet([2, 2, 2, 2], False, num_classes, input_shape[0])


@MODELS.register("resnet50")
def resnet50(input_shape: tuple[int, ...], num_classes: int):
    """ResNet-50 with bottleneck blocks, ImageNet layout (224x224 for real size)."""
    return _resnet([3, 4, 6, 3], True, num_classes, input_shape[0])


@MODELS.register("mobilenet_v2")
def mobilenet_v2(input_shape: tuple[int, ...], num_classes: int):
    """MobileNet V2 (Sandler et al.), width 1.0: inverted residuals with depthwise convs."""
    from torch import nn

    def conv_bn(inp, out, kernel, stride, groups=1):
        return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(out), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, inp, out, stride, expand):
            super().__init__()
            hidden = inp * expand
            self.use_res = stride == 1 and inp == out
            layers = [conv_bn(inp, hidden, 1, 1)] if expand != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    features = [conv_bn(input_shape[0], 32, 3, 2)]
    inp = 32
    for expand, out, repeats, stride in settings:
        for i in range(repeats):
            features.append(InvertedResidual(inp, out, stride if i == 0 else 1, expand))
            inp = out
    features.append(conv_bn(inp, 1280, 1, 1))

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    return MobileNetV2()
