"""The built-in ``resnet`` demo: a ResNet-18 as a new user wraps one, an ``nn.Sequential``.

float32 [B, 3, image, image] -> float32 [B, classes], deterministic weights, no torchvision
and no download. Its children are those of torchvision's ``resnet18`` laid out in a row
(``nn.Sequential(*resnet18().children()[:-1], nn.Flatten(), fc)``): the stem (conv, batch norm,
ReLU, max pool), four layers of two BasicBlocks each, average pool, flatten, classifier; 11
children. Each layer halves the image and doubles the channels, so the layers cost about the
same compute while their weights grow fourfold each: cut by parameter count, stage 0 of two
would hold everything up to the last layer and stage 1 only the classifier. It is the model
the cut by measured cost was made for (worker/splits.py).
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS = 3


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a 1x1 convolution where the
    shape changes), as in ResNet-18."""

    def __init__(self, width_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or width_in != width:
            self.downsample = nn.Sequential(
                nn.Conv2d(width_in, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


def build(width: int = 64, classes: int = 10, image: int = 64, seed: int = 0) -> nn.Sequential:
    """``width`` channels after the stem (64 in ResNet-18; each layer doubles them),
    ``classes`` outputs, ``image`` the side of the square input (at least 32). Same seed,
    same weights, in every process (the global RNG is left untouched)."""
    if width < 1 or classes < 1 or image < 32:
        raise ValueError(f"need width >= 1, classes >= 1 and image >= 32, got {width}, "
                         f"{classes}, {image}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        children: list[nn.Module] = [
            nn.Conv2d(CHANNELS, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1)]
        width_in = width
        for layer in range(4):
            out = width << layer
            stride = 1 if layer == 0 else 2
            children.append(nn.Sequential(BasicBlock(width_in, out, stride),
                                          BasicBlock(out, out, 1)))
            width_in = out
        children += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width_in, classes)]
        model = nn.Sequential(*children).eval()
    # The row shape requests are checked against (worker/handler.py): a conv comes first.
    model.input_shape = (CHANNELS, image, image)  # type: ignore[assignment]
    return model
