"""Convolutional trunks that turn an image batch into a feature map.

Every backbone here maps (B, 3, H, W) to (B, ``out_channels``, H', W') and has no
pooling or classifier: the embedding head owns those.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet18, resnet50


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv (no bias: the BN supplies it) → BatchNorm2d → ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def check_last_stride(last_stride: int) -> None:
    if last_stride not in (1, 2):
        raise ValueError(
            f"last_stride must be 1 (Bag-of-Tricks ReID: keep the last stage's resolution) or 2 "
            f"(the ImageNet default), got {last_stride}"
        )


class SmallCNN(nn.Module):
    """A VGG-style trunk: four stages of two 3×3 conv-BN-ReLU, 2×2 max-pool between stages.

    With ``width=32`` (32-64-128-256 channels, ~1.2 M parameters) this is the
    network that learns real photos from scratch on a CPU: on clean ORL faces at
    32×32 and 56×46 and on synthetic data it reaches >= 95 % train accuracy within
    the demo's epoch budget (benchmarks/README.md, "Backbones"), where an earlier
    design with strided convs and no pooling stayed near chance. Max-pooling keeps
    every stage at full resolution for its convs, which is what lets it learn
    small faces; ``width=16`` is a quarter of the compute for quick CPU runs.

    Total stride is 8 (4 with ``last_stride=1``): a 128×64 image gives a 16×8
    (32×16) map, a 32×32 image 4×4 (8×8).

    Args:
        width: channels of the first stage; stages have width, 2·width, 4·width,
            8·width channels, so ``out_channels == 8 * width``.
        last_stride: 2 max-pools before the last stage like before the others; 1
            skips that pool (a finer final map, 4× the last stage's compute).
    """

    def __init__(self, width: int = 32, last_stride: int = 2) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        check_last_stride(last_stride)
        channels = [width, 2 * width, 4 * width, 8 * width]
        self.stage1 = nn.Sequential(conv_bn_relu(3, channels[0]), conv_bn_relu(channels[0], channels[0]))
        self.stage2 = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), conv_bn_relu(channels[0], channels[1]),
                                    conv_bn_relu(channels[1], channels[1]))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), conv_bn_relu(channels[1], channels[2]),
                                    conv_bn_relu(channels[2], channels[2]))
        last_pool = nn.MaxPool2d(2, ceil_mode=True) if last_stride == 2 else nn.Identity()
        self.stage4 = nn.Sequential(last_pool, conv_bn_relu(channels[2], channels[3]),
                                    conv_bn_relu(channels[3], channels[3]))
        self.out_channels = channels[3]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        """Args:
            images: shape (B, 3, H, W).

        Returns:
            shape (B, 8·width, H/8, W/8) (H/4, W/4 with ``last_stride=1``), rounded up.
        """
        return self.stage4(self.stage3(self.stage2(self.stage1(images))))


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its average pool and ``fc`` head.

    The submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` …), so a
    torchvision state dict minus ``fc.*`` loads into it unchanged.

    Args:
        depth: 18 or 50.
        last_stride: 1 sets the stride of ``layer4``'s first block (its strided
            conv and its downsample shortcut) to 1, doubling the final map's
            height and width (Bag of Tricks: +~1% mAP for free on ReID).
    """

    def __init__(self, depth: int = 50, last_stride: int = 1) -> None:
        super().__init__()
        check_last_stride(last_stride)
        constructors = {18: resnet18, 50: resnet50}
        if depth not in constructors:
            raise ValueError(f"depth must be one of {sorted(constructors)}, got {depth}")
        # weights=None always: pretrained weights come only from a local file
        # (fat_distill.models.load_backbone_weights); nothing is downloaded.
        network = constructors[depth](weights=None)
        self.conv1 = network.conv1
        self.bn1 = network.bn1
        self.relu = network.relu
        self.maxpool = network.maxpool
        self.layer1 = network.layer1
        self.layer2 = network.layer2
        self.layer3 = network.layer3
        self.layer4 = network.layer4
        self.depth = depth
        self.out_channels = network.fc.in_features
        if last_stride == 1:
            # BasicBlock strides conv1, torchvision's Bottleneck (v1.5) strides
            # conv2; both stride downsample[0]. Changing every strided conv of
            # the first block covers both without naming them.
            for module in self.layer4[0].modules():
                if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                    module.stride = (1, 1)

    def forward(self, images: Tensor) -> Tensor:
        """Args:
            images: shape (B, 3, H, W).

        Returns:
            shape (B, 512 | 2048, H/32, W/32) (H/16, W/16 with ``last_stride=1``), rounded up.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
