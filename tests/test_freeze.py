"""Freezing by layer group (``autocut.freeze``): fastai's way, norm layers stay trainable."""

import numpy as np
import pytest

import autocut
from autocut.freeze import freeze_to


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



@pytest.fixture(scope="module")
def resnet():
    return autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_head_always_trains_and_n_counts_from_either_end(resnet):
    head = {f"1.{n}" for n, _ in resnet[1].named_parameters()}
    everything = {n for n, _ in resnet.named_parameters()}
    for n, groups in [(2, 3), (-1, 3), (np.int64(2), 3), (5, None), (-1, None)]:
        freeze_to(resnet, n, train_bn=False, groups=groups)
        assert _trainable(resnet) == head, (n, groups)
    for n in (0, -3, np.int32(0)):
        freeze_to(resnet, n, train_bn=False)
        assert _trainable(resnet) == everything, n
    resnet.unfreeze()


@pytest.mark.parametrize(("n", "groups", "message"), [
    (99, 3, r"^freeze_to's n=99 is out of range for 3 layer groups: pass -3 to 2 "
            r"\(2 or -1 freezes all but the head, which always trains; 0 freezes nothing\)$"),
    (3, 3, r"^freeze_to's n=3 is out of range for 3 layer groups: pass -3 to 2 "),
    (-4, 3, r"^freeze_to's n=-4 is out of range for 3 layer groups: pass -3 to 2 "),
    (6, None, r"^freeze_to's n=6 is out of range for 6 layer groups: pass -6 to 5 "),
    ("1", 3, r"^n must be an int, got '1' \(str\): pass a whole number such as 3$"),
    (True, 3, r"^n must be an int, got True \(bool\)"),
    (1.0, 3, r"^n must be an int, got 1\.0 \(float\)"),
    (None, 3, r"^n must be an int, got None \(NoneType\)"),
])
def test_an_n_that_would_freeze_the_head_or_is_no_int_is_refused(resnet, n, groups, message):
    resnet.unfreeze()
    with pytest.raises(autocut.CutError, match=message):
        freeze_to(resnet, n, groups=groups)
    if groups == 3:
        with pytest.raises(autocut.CutError, match=message):
            resnet.freeze_to(n)
    assert all(p.requires_grad for p in resnet.parameters()), "a refusal freezes nothing"
