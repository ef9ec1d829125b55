"""A zoo of small models written the way users write them, for tests and examples.

Plain ``nn.Module`` classes in the style of the originals (torchvision does not load
here): a tabular MLP with two task heads, LeNet-5, a ResNet with basic blocks, a
MobileNetV2 with inverted residuals, a DenseNet block (concatenation), a 1-D conv net
over sequences and a ViT with pre-norm attention blocks. Each takes an optional ``width`` multiplier that builds it
directly at that width (``roles.channels_at`` per channel count), only so that tests
can check :func:`fmtl_lightning.width_build.build_at_width` against an independent model.

:data:`ZOO` lists each one with an example input, its task heads and the layers that
must stay at full width (none so far).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmtl_lightning.roles import channels_at


def _c(n: int, width: float) -> int:
    return channels_at(n, width)


class TabularMLP(nn.Module):
    """Features -> two hidden layers (BatchNorm, dropout) -> a head per task."""

    def __init__(
        self, in_features: int = 12, hidden: tuple[int, int] = (32, 16), width: float = 1.0
    ):
        super().__init__()
        h0, h1 = _c(hidden[0], width), _c(hidden[1], width)
        self.fc1 = nn.Linear(in_features, h0)
        self.bn1 = nn.BatchNorm1d(h0)
        self.fc2 = nn.Linear(h0, h1)
        self.drop = nn.Dropout(0.1)
        self.heads = nn.ModuleDict({"risk": nn.Linear(h1, 3), "score": nn.Linear(h1, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, F)
        x = F.relu(self.bn1(self.fc1(x)))
        x = self.drop(F.relu(self.fc2(x)))
        return {"risk": self.heads["risk"](x), "score": self.heads["score"](x)}


class LeNet(nn.Module):
    """LeNet-5 / FedAvgCNN shape: conv-pool-conv-pool-flatten-fc-fc-head, 28x28 inputs."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: float = 1.0):
        super().__init__()
        c1, c2 = _c(6, width), _c(16, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 4 * 4, _c(120, width))
        self.fc2 = nn.Linear(_c(120, width), _c(84, width))
        self.fc3 = nn.Linear(_c(84, width), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 6, 12, 12)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, 4, 4)
        x = torch.flatten(x, 1)  # (B, 256)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: stem, one basic block per stage, global pooling, linear head."""

    def __init__(self, planes: tuple[int, ...] = (8, 16), n_classes: int = 10, width: float = 1.0):
        super().__init__()
        p = [_c(n, width) for n in planes]
        self.conv1 = nn.Conv2d(3, p[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(p[0])
        blocks, cin = [], p[0]
        for i, c in enumerate(p):
            blocks.append(BasicBlock(cin, c, stride=1 if i == 0 else 2))
            cin = c
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1)  # (B, C, 1, 1)
        return self.linear(out.view(out.size(0), -1))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand: int, width: float):
        super().__init__()
        hidden = _c(inp * expand, width)
        self.use_res = stride == 1 and inp == oup
        i, o = _c(inp, width), _c(oup, width)
        self.conv = nn.Sequential(
            nn.Conv2d(i, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, o, 1, bias=False), nn.BatchNorm2d(o),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 in miniature: stem, inverted residuals (t, c, n, s), 1x1 conv, classifier."""

    SETTINGS = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 1, 1))

    def __init__(self, n_classes: int = 10, last: int = 32, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, _c(8, width), 3, 2, 1, bias=False), nn.BatchNorm2d(_c(8, width)),
            nn.ReLU6(inplace=True),
        ]  # fmt: skip
        cin = 8
        for t, c, n, s in self.SETTINGS:
            for k in range(n):
                layers.append(InvertedResidual(cin, c, s if k == 0 else 1, t, width))
                cin = c
        layers += [nn.Conv2d(_c(cin, width), _c(last, width), 1, bias=False),
                   nn.BatchNorm2d(_c(last, width)), nn.ReLU6(inplace=True)]  # fmt: skip
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(_c(last, width), n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        x = self.features(x)
        x = x.mean([2, 3])  # (B, C)
        return self.classifier(x)


class SeqConvNet(nn.Module):
    """A 1-D conv net over (B, L, F) sequences: conv-BN-ReLU-pool, conv-GN-ReLU, mean over time."""

    def __init__(
        self,
        in_features: int = 6,
        hidden: tuple[int, int] = (16, 32),
        n_classes: int = 4,
        width: float = 1.0,
    ):
        super().__init__()
        h0, h1 = _c(hidden[0], width), _c(hidden[1], width)
        self.conv1 = nn.Conv1d(in_features, h0, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(h0)
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(h0, h1, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, h1)
        self.fc = nn.Linear(h1, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, F)
        x = x.transpose(1, 2)  # (B, F, L)
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc(x.mean(dim=-1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C + growth, H, W)
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    """A DenseNet in miniature: stem, one dense block (concatenation), transition, head."""

    def __init__(self, stem: int = 8, growth: int = 4, layers: int = 2, n_classes: int = 10,
                 width: float = 1.0):  # fmt: skip
        super().__init__()
        s, g = _c(stem, width), _c(growth, width)
        self.conv0 = nn.Conv2d(3, s, 3, padding=1, bias=False)
        self.dense = nn.Sequential(*(DenseLayer(s + i * g, g) for i in range(layers)))
        self.norm = nn.BatchNorm2d(s + layers * g)
        self.transition = nn.Conv2d(s + layers * g, _c(16, width), 1)
        self.classifier = nn.Linear(_c(16, width), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        x = self.dense(self.conv0(x))
        x = F.avg_pool2d(self.transition(F.relu(self.norm(x))), 2)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, pre-norm blocks, head on the token.

    ``width`` scales the embedding dim by whole heads (head size fixed) and the MLP dim.
    """

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 16, depth: int = 2, heads: int = 4,
                 mlp: int = 32, n_classes: int = 10, width: float = 1.0):  # fmt: skip
        super().__init__()
        d = _c(dim, width)
        n_heads = d // (dim // heads)
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(d, n_heads, _c(mlp, width)) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: ``build(width)``, an example input, its heads and full-width layers."""

    build: Callable[[float], nn.Module]
    example: Callable[[int], torch.Tensor]  # batch size -> input
    heads: tuple[str, ...]
    not_scaled: tuple[str, ...] = ()


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(lambda w: TabularMLP(width=w), lambda b: torch.randn(b, 12), ("heads",)),
    "lenet": ZooEntry(lambda w: LeNet(width=w), lambda b: torch.randn(b, 1, 28, 28), ("fc3",)),
    "resnet": ZooEntry(lambda w: ResNet(width=w), lambda b: torch.randn(b, 3, 16, 16), ("linear",)),
    "mobilenetv2": ZooEntry(
        lambda w: MobileNetV2(width=w), lambda b: torch.randn(b, 3, 16, 16), ("classifier",)
    ),
    "densenet": ZooEntry(
        lambda w: DenseNet(width=w), lambda b: torch.randn(b, 3, 8, 8), ("classifier",)
    ),
    "seqconv": ZooEntry(lambda w: SeqConvNet(width=w), lambda b: torch.randn(b, 20, 6), ("fc",)),
    "vit": ZooEntry(lambda w: TinyViT(width=w), lambda b: torch.randn(b, 3, 16, 16), ("head",)),
}
