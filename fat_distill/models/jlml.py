"""JLML: a two-branch (global + local stripes) network trained with one loss per branch.

Li, Zhu & Gong, "Person Re-Identification by Deep Joint Learning of Multi-Loss
Classification", IJCAI 2017. Low-level layers are shared by both branches (fewer
parameters, which matters on small ReID sets); the global branch sees the whole
image, the local branch sees horizontal stripes, each through its own conv
stack. Each branch has its own classifier and loss, because the paper found a
single loss on the joined feature lets one branch dominate; the two branch
features are concatenated for retrieval.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fat_distill.models.backbones import check_last_stride, conv_bn_relu
from fat_distill.models.embedding import EmbeddingModel
from fat_distill.models.heads import POOLINGS, BNNeckHead, EmbeddingOutput, check_image_batch, global_pool

BRANCHES = ("global", "local")


class JLMLBackbone(nn.Module):
    """Shared low-level layers, then a global conv stack and per-stripe local conv stacks.

    Args:
        width: channel multiplier; the shared layers have ``width`` channels, the
            global branch ends with ``8·width``, each stripe stack with ``4·width``.
        num_stripes: horizontal stripes of the shared feature map fed to the local branch.
        share_stripe_weights: one conv stack for all stripes instead of one per
            stripe (fewer parameters, no position-specific filters).
        last_stride: stride of the last conv stage of both branches (1 or 2).
    """

    def __init__(
        self, width: int = 16, num_stripes: int = 4, *, share_stripe_weights: bool = False, last_stride: int = 1
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if num_stripes < 1:
            raise ValueError(f"num_stripes must be >= 1, got {num_stripes}")
        check_last_stride(last_stride)
        self.width = width
        self.num_stripes = num_stripes
        self.share_stripe_weights = share_stripe_weights
        self.shared = nn.Sequential(conv_bn_relu(3, width, stride=2), conv_bn_relu(width, width))
        self.global_branch = nn.Sequential(
            conv_bn_relu(width, 2 * width, stride=2),
            conv_bn_relu(2 * width, 4 * width, stride=2),
            conv_bn_relu(4 * width, 8 * width, stride=last_stride),
            conv_bn_relu(8 * width, 8 * width),
        )
        num_stacks = 1 if share_stripe_weights else num_stripes
        self.stripe_branches = nn.ModuleList(
            nn.Sequential(
                conv_bn_relu(width, 2 * width, stride=2),
                conv_bn_relu(2 * width, 4 * width, stride=last_stride),
                conv_bn_relu(4 * width, 4 * width),
            )
            for _ in range(num_stacks)
        )
        self.global_channels = 8 * width
        self.stripe_channels = 4 * width
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Args:
            images: shape (B, 3, H, W).

        Returns:
            the global feature map, shape (B, 8·width, H', W'), and one map per
            stripe, top to bottom, each (B, 4·width, h_s, w_s).
        """
        shared = self.shared(images)
        rows = shared.shape[2]
        if rows < self.num_stripes:
            raise ValueError(
                f"JLML: the shared feature map has {rows} rows for {self.num_stripes} stripes "
                f"(input height {images.shape[2]}); use taller images or fewer stripes"
            )
        # tensor_split tolerates heights not divisible by num_stripes (e.g. 112-high faces).
        stripes = torch.tensor_split(shared, self.num_stripes, dim=2)
        stacks = (
            [self.stripe_branches[0]] * self.num_stripes if self.share_stripe_weights else list(self.stripe_branches)
        )
        return self.global_branch(shared), [stack(stripe) for stack, stripe in zip(stacks, stripes)]


class JLMLModel(EmbeddingModel):
    """JLML with a BNNeck head and a classifier per branch.

    ``forward`` returns an :class:`EmbeddingOutput` whose ``branches`` hold the
    ``"global"`` and ``"local"`` outputs (each (B, D/2) features and (B, C)
    logits): apply CE and metric losses per branch (``out.branch_outputs()``), as
    the paper does. The top-level ``features``/``bn_features`` are the two branch
    vectors concatenated, (B, D), used for retrieval; the top-level ``logits`` are
    the mean of the branch logits, a single prediction for confidence scoring.

    Each branch ends in a linear feature-selection layer (pooled vector →
    D/2); the paper's structured-sparsity regulariser, a group-lasso (L2,1)
    penalty on those layers, is optional (``TrainConfig.group_lasso_weight``,
    off by default) and switches off whole input features.

    Args:
        num_classes: identities per classifier; 0 = feature-only model.
        embedding_dim: total width D of the concatenated features, split equally
            between the branches; must be even. ``None`` gives ``16·width``.
        width: channel multiplier of :class:`JLMLBackbone`.
        num_stripes: horizontal stripes of the local branch.
        share_stripe_weights: see :class:`JLMLBackbone`.
        last_stride: 1 or 2, stride of each branch's last stage.
        pooling: ``"avg"`` or ``"max"``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        embedding_dim: int | None = None,
        width: int = 16,
        num_stripes: int = 4,
        share_stripe_weights: bool = False,
        last_stride: int = 1,
        pooling: str = "avg",
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        embedding_dim = 16 * width if embedding_dim is None else embedding_dim
        if embedding_dim < 2 or embedding_dim % 2:
            raise ValueError(
                f"JLML embedding_dim is split equally between the global and local branches, "
                f"so it must be even and >= 2, got {embedding_dim}"
            )
        super().__init__(embedding_dim, num_classes)
        self.backbone = JLMLBackbone(
            width, num_stripes, share_stripe_weights=share_stripe_weights, last_stride=last_stride
        )
        self.pooling = pooling
        branch_dim = embedding_dim // 2
        # Each branch keeps its linear feature-selection layer even when the widths match:
        # it is what the group-lasso penalty (feature_selection_weights) acts on.
        self.global_head = BNNeckHead(self.backbone.global_channels, branch_dim, num_classes, always_project=True)
        self.local_head = BNNeckHead(num_stripes * self.backbone.stripe_channels, branch_dim, num_classes,
                                     always_project=True)

    def feature_selection_weights(self) -> dict[str, Tensor]:
        """Each branch's feature-selection layer weight, ``(branch_dim, pooled width)``.

        Their input columns are the pooled channels of the branch (for the local
        branch, stripe by stripe); an all-zero column is a deselected feature.
        ``TrainConfig.group_lasso_weight > 0`` applies the group-lasso (L2,1)
        proximal step to them (see :mod:`fat_distill.models.sparsity`).
        """
        return {"global": self.global_head.projection.weight, "local": self.local_head.projection.weight}

    def forward(self, images: Tensor) -> EmbeddingOutput:
        """Args:
            images: shape (B, 3, H, W), float.

        Returns:
            :class:`EmbeddingOutput` with (B, D) concatenated features and
            bn_features, (B, C) mean logits (or ``None``), and per-branch outputs
            under ``branches["global"]`` and ``branches["local"]``.
        """
        check_image_batch(images)
        global_map, stripe_maps = self.backbone(images)
        global_out = self.global_head(global_pool(global_map, self.pooling))
        # Each stripe is pooled on its own so the local vector keeps where
        # (which stripe) a cue was seen.
        local_pooled = torch.cat([global_pool(stripe, self.pooling) for stripe in stripe_maps], dim=1)
        local_out = self.local_head(local_pooled)
        logits = None
        if global_out.logits is not None and local_out.logits is not None:
            logits = (global_out.logits + local_out.logits) / 2
        return EmbeddingOutput(
            features=torch.cat([global_out.features, local_out.features], dim=1),
            bn_features=torch.cat([global_out.bn_features, local_out.bn_features], dim=1),
            logits=logits,
            branches={"global": global_out, "local": local_out},
        )
