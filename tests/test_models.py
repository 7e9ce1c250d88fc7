"""Embedding models: shapes, BNNeck semantics, last stride, local weights, JLML, channels_last, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fat_distill.models import (
    MODELS,
    EmbeddingModel,
    EmbeddingOutput,
    JLMLModel,
    WeightsError,
    available_models,
    build_model,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", ["small_cnn", "jlml"])
@pytest.mark.parametrize("height, width", [(128, 64), (112, 92)])
def test_small_models_give_embedding_and_logit_shapes(name: str, height: int, width: int) -> None:
    model = build_model(name, num_classes=7, embedding_dim=32, width=8)
    out = model(torch.randn(3, 3, height, width))
    assert isinstance(model, EmbeddingModel)
    assert model.embedding_dim == 32 and model.num_classes == 7
    assert out.features.shape == (3, 32)
    assert out.bn_features.shape == (3, 32)
    assert out.logits is not None and out.logits.shape == (3, 7)


@pytest.mark.parametrize("name, default_dim", [("resnet18", 512), ("resnet50", 2048)])
def test_resnets_keep_backbone_width_by_default(name: str, default_dim: int) -> None:
    model = build_model(name, num_classes=4)
    out = model(torch.randn(2, 3, 64, 32))
    assert model.embedding_dim == default_dim
    assert out.features.shape == (2, default_dim)
    assert out.logits is not None and out.logits.shape == (2, 4)


def test_registry_lists_models_and_rejects_unknown_names() -> None:
    assert available_models() == sorted(MODELS) == ["jlml", "resnet18", "resnet50", "small_cnn", "tiny_cnn"]
    with pytest.raises(KeyError, match="available models: jlml, resnet18"):
        build_model("resnet1000", num_classes=3)


def test_num_classes_zero_builds_a_feature_only_model() -> None:
    model = build_model("small_cnn", num_classes=0, width=8)
    out = model(torch.randn(2, 3, 64, 32))
    assert out.logits is None
    assert model.num_classes == 0
    assert not any("classifier" in name for name, _ in model.named_parameters())
    jlml = build_model("jlml", num_classes=0, width=4)
    jlml_out = jlml(torch.randn(2, 3, 64, 32))
    assert jlml_out.logits is None and all(branch.logits is None for branch in jlml_out.branch_outputs())


def test_bnneck_normalises_features_and_classifies_bn_features_in_train_mode() -> None:
    model = build_model("small_cnn", num_classes=5, embedding_dim=16, width=8).train()
    out = model(torch.randn(8, 3, 64, 32))
    head = model.head
    # f_i is f_t batch-normalised with the batch's statistics (BN bias is 0 and frozen).
    mean = out.features.mean(dim=0)
    var = out.features.var(dim=0, unbiased=False)
    expected = (out.features - mean) / torch.sqrt(var + head.bottleneck.eps) * head.bottleneck.weight
    torch.testing.assert_close(out.bn_features, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.features, out.bn_features)
    # The classifier sees f_i, has no bias, and the BN shift is not trained.
    assert head.classifier is not None and head.classifier.bias is None
    torch.testing.assert_close(out.logits, out.bn_features @ head.classifier.weight.T)
    assert not head.bottleneck.bias.requires_grad
    out.logits.sum().backward()
    assert head.bottleneck.bias.grad is None


def test_eval_mode_embeds_with_running_statistics_independent_of_the_batch() -> None:
    model = build_model("small_cnn", num_classes=5, embedding_dim=16, width=8)
    images = torch.randn(6, 3, 64, 32)
    model.train()
    for _ in range(3):  # move the running statistics away from their initial values
        model(images)
    in_batch_train = model(images).bn_features[:2]
    alone_train = model(images[:2]).bn_features
    assert not torch.allclose(in_batch_train, alone_train, atol=1e-3)  # batch statistics differ

    model.eval()
    with torch.inference_mode():
        in_batch = model.embed(images)[:2]
        alone = model.embed(images[:2])
        out = model(images)
    torch.testing.assert_close(in_batch, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.embed(images), out.bn_features)
    bn = model.head.bottleneck
    expected = (out.features - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
    torch.testing.assert_close(out.bn_features, expected, rtol=1e-4, atol=1e-5)


def test_last_stride_one_doubles_the_final_resnet18_feature_map() -> None:
    images = torch.randn(2, 3, 64, 32)
    strided = build_model("resnet18", num_classes=0, last_stride=2).backbone(images)
    unstrided = build_model("resnet18", num_classes=0, last_stride=1).backbone(images)
    assert strided.shape == (2, 512, 2, 1)
    assert unstrided.shape == (2, 512, 4, 2)


def test_last_stride_must_be_one_or_two() -> None:
    with pytest.raises(ValueError, match="last_stride must be 1"):
        build_model("small_cnn", num_classes=2, last_stride=3)


def _saved_resnet18(tmp_path, wrap: bool) -> tuple[str, dict[str, torch.Tensor]]:
    state = torchvision.models.resnet18(weights=None).state_dict()  # includes the ImageNet fc.* head
    path = tmp_path / "resnet18.pth"
    torch.save({"model": state, "epoch": 3} if wrap else state, path)
    return str(path), state


@pytest.mark.parametrize("wrap", [False, True], ids=["plain_state_dict", "model_key"])
def test_resnet18_weights_round_trip_from_a_local_file(tmp_path, wrap: bool) -> None:
    path, state = _saved_resnet18(tmp_path, wrap)
    model = build_model("resnet18", num_classes=3, weights=path, last_stride=1)
    loaded = model.backbone.state_dict()
    assert set(loaded) == {key for key in state if not key.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_missing_weights_file_is_named(tmp_path) -> None:
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(WeightsError, match=r"resnet50\.pth.*does not exist.*never downloaded"):
        build_model("resnet50", num_classes=3, weights=path)


def test_non_checkpoint_weights_file_is_named(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match=r"notes\.txt.*not a readable PyTorch checkpoint"):
        build_model("resnet18", num_classes=3, weights=path)
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(WeightsError, match=r"list\.pt.*not a state dict"):
        build_model("resnet18", num_classes=3, weights=listed)


def test_mismatched_weights_name_the_file_and_first_keys(tmp_path) -> None:
    path, _ = _saved_resnet18(tmp_path, wrap=False)
    with pytest.raises(WeightsError) as caught:
        build_model("resnet50", num_classes=3, weights=path)
    message = str(caught.value)
    assert "resnet18.pth" in message
    assert "missing from the file: layer1.0.conv3.weight" in message
    assert "shape mismatches: layer1.0.conv1.weight (file (64, 64, 3, 3), model (64, 64, 1, 1))" in message


def test_jlml_returns_per_branch_logits_and_concatenated_features() -> None:
    model = build_model("jlml", num_classes=6, embedding_dim=24, width=4, num_stripes=4)
    assert isinstance(model, JLMLModel)
    out = model(torch.randn(4, 3, 128, 64))
    assert set(out.branches) == {"global", "local"}
    global_out, local_out = out.branches["global"], out.branches["local"]
    for branch in (global_out, local_out):
        assert isinstance(branch, EmbeddingOutput)
        assert branch.features.shape == (4, 12) and branch.bn_features.shape == (4, 12)
        assert branch.logits is not None and branch.logits.shape == (4, 6)
    torch.testing.assert_close(out.features, torch.cat([global_out.features, local_out.features], dim=1))
    torch.testing.assert_close(out.bn_features, torch.cat([global_out.bn_features, local_out.bn_features], dim=1))
    torch.testing.assert_close(out.logits, (global_out.logits + local_out.logits) / 2)
    assert out.branch_outputs() == [global_out, local_out]
    # The two classifiers are separate parameters (multi-loss, not one shared head).
    assert model.global_head.classifier is not model.local_head.classifier


@pytest.mark.parametrize("share", [False, True], ids=["own_weights", "shared_weights"])
def test_each_jlml_stripe_map_depends_only_on_its_own_rows(share: bool) -> None:
    # 92 rows: the shared map's 46 rows split 12/12/11/11 (tensor_split), not evenly
    backbone = build_model("jlml", num_classes=3, width=4, num_stripes=4, share_stripe_weights=share).eval().backbone
    shared = {}
    backbone.shared.register_forward_hook(lambda module, inputs, output: shared.update(map=output))
    images = torch.randn(2, 3, 92, 40)

    _, stripe_maps = backbone(images)
    rows = shared["map"].shape[2]
    bounds = torch.tensor_split(torch.arange(rows), 4)
    for k, stripe in enumerate(stripe_maps):
        (grad,) = torch.autograd.grad(stripe.square().sum(), shared["map"], retain_graph=True)
        touched = grad.abs().sum(dim=(0, 1, 3)) > 0  # per row of the shared map
        own = torch.zeros(rows, dtype=torch.bool)
        own[bounds[k]] = True
        assert not touched[~own].any(), f"stripe {k} uses rows {torch.nonzero(touched & ~own).flatten().tolist()}"
        assert touched[own].any(), f"stripe {k} does not use its own rows"

    # Changing the image's top quarter (and the shared layers' reach below it) leaves the bottom stripes alone.
    changed = images.clone()
    changed[:, :, :20] = torch.randn(2, 3, 20, 40)
    with torch.no_grad():
        _, before = backbone(images)
        _, after = backbone(changed)
    assert not torch.allclose(before[0], after[0])
    for k in (2, 3):
        torch.testing.assert_close(after[k], before[k])


def test_jlml_stripe_options_are_checked() -> None:
    model = build_model("jlml", num_classes=3, width=4, num_stripes=4, share_stripe_weights=True).eval()
    assert len(model.backbone.stripe_branches) == 1
    assert len(build_model("jlml", num_classes=3, width=4).backbone.stripe_branches) == 4
    with pytest.raises(ValueError, match="must be even"):
        build_model("jlml", num_classes=3, embedding_dim=15)
    with pytest.raises(ValueError, match="rows for 8 stripes"):
        build_model("jlml", num_classes=3, width=4, num_stripes=8)(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("name, size", [("small_cnn", (128, 64)), ("jlml", (112, 92)), ("resnet18", (64, 32))])
def test_channels_last_gives_the_same_embeddings(name: str, size: tuple[int, int]) -> None:
    options = {"width": 8} if name in ("small_cnn", "jlml") else {}
    model = build_model(name, num_classes=3, **options).eval()
    images = torch.randn(2, 3, *size)
    with torch.inference_mode():
        reference = model(images)
        model = model.to(memory_format=torch.channels_last)
        result = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(result.bn_features, reference.bn_features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.logits, reference.logits, rtol=1e-4, atol=1e-4)


def test_non_image_batches_are_rejected_with_their_shape() -> None:
    model = build_model("small_cnn", num_classes=3, width=4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(2, 1, 64, 32\)"):
        model(torch.randn(2, 1, 64, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 64, 32, dtype=torch.uint8))


def test_small_cnn_learns_separable_identities() -> None:
    num_classes, per_class = 4, 8
    # Each identity is a distinct colour pattern plus noise: separable, but only
    # if the network actually fits something.
    prototypes = torch.randn(num_classes, 3, 32, 16)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = prototypes[labels] + 0.5 * torch.randn(len(labels), 3, 32, 16)
    model = build_model("small_cnn", num_classes=num_classes, embedding_dim=32, width=8).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(images).logits, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(num_classes))).item(), abs=0.05)
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    with torch.inference_mode():
        accuracy = (model(images).logits.argmax(dim=1) == labels).float().mean().item()
    assert accuracy == 1.0


def test_small_cnn_is_the_vgg_style_network_and_tiny_cnn_its_half_width():
    """Two 3×3 conv-BN-ReLU per stage, 32-64-128-256 channels, max-pool between stages, ~1.2 M parameters."""
    model = build_model("small_cnn", num_classes=0, last_stride=2)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.backbone.modules()) == 3
    assert 1.1e6 < sum(p.numel() for p in model.parameters()) < 1.3e6
    assert model.backbone(torch.randn(1, 3, 32, 32)).shape == (1, 256, 4, 4)
    # last_stride 1 skips the pool before the last stage: a finer final map, same weights
    assert build_model("small_cnn", 0, last_stride=1).backbone(torch.randn(1, 3, 32, 32)).shape == (1, 256, 8, 8)
    tiny = build_model("tiny_cnn", num_classes=0)
    assert tiny.embedding_dim == 128 and 0.25e6 < sum(p.numel() for p in tiny.parameters()) < 0.35e6
