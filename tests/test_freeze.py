"""Freezing by layer group (``autocut.freeze``): fastai's way, norm layers stay trainable."""

import autocut


def test_freeze_keeps_norms_trainable_and_unfreeze_restores():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    model.freeze()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("1.") or ".bn" in n or n.startswith("0.bn") or "downsample.1" in n for n in trainable)
    assert "0.conv1.weight" not in trainable and "0.layer4.1.conv2.weight" not in trainable
    assert "0.layer4.1.bn2.weight" in trainable and "1.4.weight" in trainable
    model.freeze_to(1)
    body = model[0]
    assert body.get_parameter("layer4.1.conv2.weight").requires_grad
    assert not body.get_parameter("layer1.0.conv1.weight").requires_grad
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    vit = autocut.adapt("vit_tiny_patch16_224", n_out=2).freeze()
    names = {n for n, p in vit.named_parameters() if p.requires_grad and n.startswith("0.")}
    assert names and all("norm" in n for n in names)  # LayerNorms of a graph body stay trainable


def test_freeze_without_train_bn_freezes_norms_too():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    model.freeze(train_bn=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"1.{n}" for n, _ in model[1].named_parameters()}
    model.freeze_to(1, train_bn=False)
    assert not model[0].get_parameter("layer1.0.bn1.weight").requires_grad
    assert model[0].get_parameter("layer4.0.bn1.weight").requires_grad


def test_freezing_by_stage_and_by_default_keeps_norms_trainable():
    from autocut.freeze import freeze_to

    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    model.freeze_to(1)  # train_bn by default
    assert model[0].get_parameter("layer1.0.bn1.weight").requires_grad
    assert not model[0].get_parameter("layer1.0.conv1.weight").requires_grad
    freeze_to(model, 2, groups=None)  # the first two stages (stem, layer1), by stage
    assert not model[0].get_parameter("layer1.0.conv1.weight").requires_grad
    assert model[0].get_parameter("layer2.0.conv1.weight").requires_grad
    assert model[0].get_parameter("bn1.weight").requires_grad  # a norm, and train_bn by default

