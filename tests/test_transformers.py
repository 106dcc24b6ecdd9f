"""Hugging Face transformers as a third zoo: model types built from their default configs,
checkpoints saved and loaded back (no network), cuts that read inside ``ModelOutput``s, checked
against the models' own ``last_hidden_state``."""

import pytest
import torch

import autocut
from autocut import zoo
from autocut.scan.check import check_model
from autocut.scan.oracles import transformers_expected
from autocut.scan.runner import zoo_names

transformers = pytest.importorskip("transformers")

# cut silently at the stem's output (``*.encoder:input``) or read as the wrong layout before
# structured outputs were read: each must be cut where its last_hidden_state is
ONCE_WRONG = ["convnext", "resnet", "regnet", "donut-swin", "swiftformer", "hgnet_v2"]


@pytest.mark.parametrize("model_type", ONCE_WRONG)
def test_model_types_are_cut_where_their_last_hidden_state_is(model_type):
    spec = zoo.resolve(f"transformers:{model_type}")
    meta = zoo.build(spec)
    cut = autocut.discover(meta)
    expected = transformers_expected(meta, torch.empty(3, *cut.input_size, device="meta"))
    assert (3, *cut.feature_shape) == tuple(expected)
    assert str(autocut.discover(f"transformers:{model_type}")) == str(cut).replace(type(meta).__name__, str(spec), 1)


def tiny(kind: str):
    """Small real models of three families (a convnet, a hierarchical and a plain transformer)."""
    torch.manual_seed(0)
    if kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                           num_labels=5)
    elif kind == "swin":
        config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                         window_size=4, num_labels=5)
    else:
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32, num_labels=5)
    return transformers.AutoModelForImageClassification.from_config(config).eval()


def own_map(model, x):
    """The model's own last_hidden_state as (B, C, h, w): tokens without the class token."""
    h = model.base_model(x).last_hidden_state
    if h.ndim == 4:
        return h
    b, n, c = h.shape
    side = int(n ** 0.5)
    return h[:, n - side * side:].transpose(1, 2).reshape(b, c, side, side)


@pytest.mark.parametrize("kind, where", [("resnet", "resnet.encoder:last_hidden_state"), ("swin", "swin.layernorm"),
                                         ("vit", "vit:last_hidden_state")])
def test_the_body_returns_the_models_own_map_and_the_adapted_model_takes_a_tensor(kind, where):
    model = tiny(kind)
    adapted = autocut.adapt(model, n_out=3, input_size=(3, 32, 32))
    assert adapted.cut.where == where and adapted.cut.method == "export"  # fx cannot trace them; torch.export can
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(adapted.body.eval()(x), own_map(model, x))
    adapted.train()
    out = adapted(x)
    assert out.shape == (2, 3)
    out.sum().backward()  # the body's parameters are the model's own, and they train
    assert model.base_model.embeddings.patch_embeddings.projection.weight.grad is not None if kind != "resnet" \
        else model.resnet.embedder.embedder.convolution.weight.grad is not None
    assert all(not n.startswith("classifier") for n, _ in adapted.body.named_parameters())


def test_a_saved_checkpoint_loads_back_with_its_weights(tmp_path):
    model = tiny("vit")
    model.save_pretrained(tmp_path)
    name = f"transformers:{tmp_path}"
    assert zoo.resolve(name) == zoo.ModelSpec("transformers", str(tmp_path))
    loaded = autocut.adapt(name, n_out=3, pretrained=True)
    assert loaded.cut.input_size == (3, 32, 32)  # from the checkpoint's config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.body.eval()(x), own_map(model, x))
        random = autocut.adapt(name, n_out=3)  # its config, random weights
        assert not torch.equal(random.body.eval()(x), own_map(model, x))


def test_names_that_are_no_transformers_model_and_types_with_no_weights_are_refused():
    with pytest.raises(autocut.CutError, match=r"unknown transformers model 'convnxt'; close model types: convnext"):
        zoo.resolve("transformers:convnxt")
    with pytest.raises(autocut.CutError, match=r"transformers:convnext is a model type, which has no weights: name a "
                                               r"checkpoint"):
        autocut.adapt("transformers:convnext", n_out=2, pretrained=True)


def test_the_scan_covers_the_transformers_zoo_against_its_own_outputs():
    names = zoo_names("transformers")
    assert "transformers:resnet" in names and "transformers:rt_detr_resnet" in names  # classifiers and backbones
    assert set(zoo_names("all")) >= set(names)
    rec = check_model("transformers:resnet")
    assert (rec["status"], rec["where"], rec["body_shape"], rec["expected_shape"]) == (
        "ok", "resnet.encoder:last_hidden_state", [3, 2048, 7, 7], [3, 2048, 7, 7])
    rec = check_model("transformers:imagegpt")  # takes pixel cluster ids, no image
    assert (rec["status"], rec["reason"]) == ("differs", "no image input")
