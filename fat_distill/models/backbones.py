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
    """Four stages of conv-BN-ReLU blocks: a backbone that trains in seconds on CPU.

    Total stride is 16 (8 with ``last_stride=1``): a 128×64 image gives an 8×4
    (16×8) map, a 112×92 image 7×6 (14×12).

    Args:
        width: channels of the first stage; stages have width, 2·width, 4·width,
            8·width channels, so ``out_channels == 8 * width``.
        last_stride: stride of the last stage (1 keeps a finer final map).
    """

    def __init__(self, width: int = 16, last_stride: int = 1) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        check_last_stride(last_stride)
        self.stem = conv_bn_relu(3, width, stride=2)
        self.stage1 = conv_bn_relu(width, width)
        self.stage2 = nn.Sequential(conv_bn_relu(width, 2 * width, stride=2), conv_bn_relu(2 * width, 2 * width))
        self.stage3 = nn.Sequential(conv_bn_relu(2 * width, 4 * width, stride=2), conv_bn_relu(4 * width, 4 * width))
        self.stage4 = nn.Sequential(
            conv_bn_relu(4 * width, 8 * width, stride=last_stride), conv_bn_relu(8 * width, 8 * width)
        )
        self.out_channels = 8 * width
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        """Args:
            images: shape (B, 3, H, W).

        Returns:
            shape (B, 8·width, H/16, W/16) (H/8, W/8 with ``last_stride=1``), rounded up.
        """
        return self.stage4(self.stage3(self.stage2(self.stage1(self.stem(images)))))


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
