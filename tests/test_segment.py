"""``finetune(task="segment")`` and its parts: mask folders (and every error they can hold), joint
image/mask transforms, the metrics (against scikit-learn's), checkpoints of U-Nets, mask prediction."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from autocut import cli
from autocut.finetune import checkpoint, finetune, load_model, predict, predict_masks
from autocut.finetune.data import Data, sample_seed
from autocut.finetune.masks import (
    IGNORE,
    MaskTensors,
    ShapeDraws,
    load_masks,
    mask_folder,
    mask_transform,
    read_mask,
    shapes_data,
)
from autocut.finetune.metrics import confusion_matrix, segment_scores
from autocut.finetune.predict import class_shares, palette, save_mask
from autocut.finetune.shapes import CLASSES
from autocut.finetune.train import DEFAULTS
from autocut.unet import Unet

ARCH = DEFAULTS["segment"].arch
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_shapes() -> Data:
    return shapes_data(size=SIZE, n=48, seed=3)


# --- metrics -----------------------------------------------------------------------------------


def test_confusion_and_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(3, 9, 7))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 4, size=target.shape))
    pred[pred == 3] = 2  # class 3 never predicted: its IoU is 0, not left out
    target[0, 0, :3] = IGNORE
    keep = target != IGNORE
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 4, IGNORE)
    np.testing.assert_array_equal(cm.numpy(), sk_confusion(target[keep], pred[keep], labels=range(4)))
    scores = segment_scores(cm)
    ious = jaccard_score(target[keep], pred[keep], labels=range(4), average=None)
    assert scores["iou"] == pytest.approx(list(ious)) and scores["iou"][3] == 0
    assert scores["miou"] == pytest.approx(ious.mean())
    assert scores["pixel_accuracy"] == pytest.approx((pred[keep] == target[keep]).mean())


def test_a_class_absent_from_targets_and_predictions_is_left_out_of_the_mean():
    cm = torch.tensor([[5, 1, 0], [2, 4, 0], [0, 0, 0]])
    scores = segment_scores(cm)
    assert scores["iou"] == [pytest.approx(5 / 8), pytest.approx(4 / 7), None]
    assert scores["miou"] == pytest.approx((5 / 8 + 4 / 7) / 2)


# --- mask folders ------------------------------------------------------------------------------


def _scene(i: int, side: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright square (class 1) and a dark bar (class 2) on grey, and its mask."""
    image = np.full((side, side + 4, 3), 128, dtype=np.uint8)
    mask = np.zeros((side, side + 4), dtype=np.uint8)
    a = 2 + i % 5
    image[a:a + 8, a:a + 8] = 240
    mask[a:a + 8, a:a + 8] = 1
    image[side - 5:side - 2, 3:side] = 20
    mask[side - 5:side - 2, 3:side] = 2
    return image, mask


def _mask_folder(root: Path, n: int = 12, classes: list[str] | None = ("background", "square", "bar")) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = _scene(i)
        Image.fromarray(image).save(root / "images" / f"scene{i:02d}.jpg" if i % 2 else root / "images" / f"scene{i:02d}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"scene{i:02d}.png")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_a_mask_folder_reads_classes_pairs_and_values(tmp_path):
    root = _mask_folder(tmp_path / "set")
    data = mask_folder(root, size=SIZE, augment=False, valid_pct=0.25)
    assert data.classes == ["background", "square", "bar"] and (len(data.train), len(data.valid)) == (9, 3)
    x, y = data.valid[0]
    assert x.shape == (3, SIZE, SIZE) and y.shape == (SIZE, SIZE) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == {0, 1, 2}
    # the mask is resized with nearest neighbours, the image smoothly: but for edges, each mask pixel
    # is the class the image shows there
    grey = x.mean(0)
    assert (grey[y == 1] > 1.5).float().mean() > 0.85 and (grey[y == 0] < 1.5).float().mean() > 0.95


def test_without_classes_txt_classes_are_numbered_and_said(tmp_path):
    data = mask_folder(_mask_folder(tmp_path / "set", classes=None), size=SIZE)
    assert data.classes == ["0", "1", "2"] and "no classes.txt" in data.notes[0]


def test_train_and_valid_folders_are_used_as_given(tmp_path):
    _mask_folder(tmp_path / "set" / "train", n=6)
    _mask_folder(tmp_path / "set" / "valid", n=2)
    (tmp_path / "set" / "classes.txt").write_text("bg\nsquare\nbar\n")
    data = mask_folder(tmp_path / "set", size=SIZE)
    assert (len(data.train), len(data.valid)) == (6, 2) and data.classes == ["bg", "square", "bar"]
    assert all("/valid/" in str(p[0]) for p in data.valid.pairs)


def test_missing_masks_are_named(tmp_path):
    root = _mask_folder(tmp_path / "set")
    (root / "masks" / "scene03.png").unlink()
    (root / "masks" / "scene07.png").unlink()
    with pytest.raises(ValueError, match=r"2 of 12 images in .*images have no mask in .*masks: scene03.jpg \(expected "
                                         r"masks/scene03.png\), scene07.jpg"):
        mask_folder(root, size=SIZE)


def test_a_mask_of_another_size_is_named(tmp_path):
    root = _mask_folder(tmp_path / "set")
    Image.fromarray(np.zeros((10, 12), np.uint8), "L").save(root / "masks" / "scene04.png")
    with pytest.raises(ValueError, match=r"image .*scene04.png is 24x20 but its mask .*scene04.png is 12x10"):
        mask_folder(root, size=SIZE)


def test_a_class_index_out_of_range_is_named(tmp_path):
    root = _mask_folder(tmp_path / "set")
    _, mask = _scene(5)
    mask[0, 0] = 7
    Image.fromarray(mask, "L").save(root / "masks" / "scene05.png")
    with pytest.raises(ValueError, match=r"mask .*scene05.png holds class index 7, but .*classes.txt lists 3 classes "
                                         r"\(indices 0 to 2\)"):
        mask_folder(root, size=SIZE)


def test_255_is_ignored_not_a_class(tmp_path):
    root = _mask_folder(tmp_path / "set")
    _, mask = _scene(5)
    mask[0, :] = IGNORE
    Image.fromarray(mask, "L").save(root / "masks" / "scene05.png")
    assert mask_folder(root, size=SIZE).classes == ["background", "square", "bar"]


def test_a_colour_mask_is_refused(tmp_path):
    root = _mask_folder(tmp_path / "set")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8), "RGB").save(root / "masks" / "scene02.png")
    with pytest.raises(ValueError, match=r"mask .*scene02.png is a RGB image: masks are single-channel PNGs"):
        mask_folder(root, size=SIZE)


def test_folders_that_are_not_a_segmentation_set_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --data shapes or a folder of images/ and masks/"):
        load_masks(tmp_path / "nowhere", SIZE)
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="no images/ folder in .*cats: a segmentation folder holds images/ and masks/"):
        load_masks(tmp_path / "cats", SIZE)


def test_augmentation_moves_image_and_mask_together():
    image, mask = _scene(1, side=40)
    tfm = mask_transform(SIZE, (0, 0, 0), (1, 1, 1), augment=True)
    from torchvision import tv_tensors

    checked = 0
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = tfm(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask)))
        grey = x.mean(0)  # the square lies where its mask says, wherever the crop and flip put it (edges blend)
        bright, marked = (grey > 0.8).nonzero().float(), (y == 1).nonzero().float()
        if len(marked) >= 16 and len(bright) >= 16:
            assert (bright.mean(0) - marked.mean(0)).norm() < 2.0, seed
            checked += 1
        assert (grey[y == 0] < 0.8).float().mean() > 0.95, seed
    assert checked >= 4


def test_the_embedded_shapes_are_the_generators():
    data = shapes_data(size=SIZE, n=10, seed=4, valid_pct=0.2)
    assert data.classes == list(CLASSES) and data.source == "shapes"
    from autocut.finetune.shapes import shapes

    _, masks = shapes(10, size=SIZE, seed=4)
    got = torch.cat([data.train.y, data.valid.y])
    assert sorted(map(bytes, got.numpy().astype(np.int64))) == sorted(map(bytes, masks))


@pytest.mark.parametrize("n_in", [3, 1])
def test_the_embedded_tensors_are_what_the_same_images_as_png_files_give(tmp_path, n_in):
    from autocut.finetune.shapes import shapes

    images, masks = shapes(10, size=SIZE, seed=4)
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image, "RGB").save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8), "L").save(tmp_path / "masks" / f"{i}.png")
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    files = mask_folder(tmp_path, SIZE, n_in, mean, std, valid_pct=0.2, seed=4, augment=False)
    embedded = shapes_data(SIZE, n_in, mean, std, valid_pct=0.2, seed=4, n=10)
    order = sorted(range(10), key=str)  # the folder lists 0.png, 1.png, ... in name order
    for mine, theirs in ((embedded.train, files.train), (embedded.valid, files.valid)):
        assert len(mine) == len(theirs)
        for i in range(len(mine)):
            (x, y), (fx, fy) = mine[i], theirs[i]
            torch.testing.assert_close(x, fx, rtol=0, atol=1e-6)
            assert torch.equal(y, fy)
    assert order == list(range(10))


def test_redrawn_shapes_are_new_each_epoch_and_the_same_for_the_same_epoch():
    fixed = shapes_data(size=SIZE, n=10, seed=4, valid_pct=0.2)
    drawn = shapes_data(size=SIZE, n=10, seed=4, valid_pct=0.2, redraw=True)
    assert isinstance(drawn.train, ShapeDraws) and len(drawn.train) == len(fixed.train) == 8
    assert torch.equal(drawn.valid.x, fixed.valid.x) and torch.equal(drawn.valid.y, fixed.valid.y)
    from autocut.finetune.shapes import shapes

    by_epoch = {}
    for epoch in (0, 1, 0):
        drawn.train.set_epoch(epoch)
        _, masks = shapes(8, size=SIZE, seed=sample_seed(4, epoch, 0, stream=2))
        assert torch.equal(drawn.train.y, torch.from_numpy(masks)), epoch
        x, y = drawn.train[3]
        assert torch.equal(y, drawn.train.y[3]) and x.shape == (3, SIZE, SIZE)
        by_epoch.setdefault(epoch, drawn.train.x.clone())
    assert torch.equal(drawn.train.x, by_epoch[0]) and not torch.equal(by_epoch[0], by_epoch[1])
    # no training image is a validation image, nor one of the fixed split's
    assert not any(torch.equal(a, b) for a in by_epoch[0] for b in torch.cat([fixed.train.x, fixed.valid.x]))


def test_the_embedded_set_is_redrawn_with_augmentation_only():
    assert isinstance(load_masks("shapes", SIZE, augment=True).train, ShapeDraws)
    assert type(load_masks("shapes", SIZE, augment=False).train) is MaskTensors


# --- finetune, checkpoints, predict ---------------------------------------------------------------


def test_finetune_segment_learns_saves_and_predicts(tmp_path, small_shapes):
    out = tmp_path / "run"
    model, history = finetune(ARCH, small_shapes, task="segment", size=SIZE, epochs=2, bs=8, lr=3e-3, out=out,
                              progress=False)
    assert isinstance(model, Unet) and [r["epoch"] for r in history] == [0, 1]
    assert set(history[0]) == {"epoch", "phase", "train_loss", "valid_loss", "pixel_accuracy", "miou", "time"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    meta = json.loads((out / checkpoint.MODEL_META).read_text())
    assert meta["task"] == "segment" and meta["classes"] == list(CLASSES) and meta["head_options"] == {}
    assert meta["options"]["task"] == "segment"

    loaded, meta = load_model(out)
    x = small_shapes.valid.x[:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        # the metrics the run reported are those of its model on its validation set
        pred = torch.cat([model(small_shapes.valid.x[i:i + 8]).argmax(1) for i in range(0, len(small_shapes.valid), 8)])
    cm = confusion_matrix(pred, small_shapes.valid.y, len(CLASSES))
    assert segment_scores(cm)["miou"] == pytest.approx(history[-1]["miou"])

    images = [Image.fromarray(np.full((40, 50, 3), 90, np.uint8)), Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8))]
    masks = predict_masks(out, images)
    assert [m.shape for m in masks] == [(40, 50), (SIZE, SIZE)] and masks[0].dtype == np.uint8
    with pytest.raises(ValueError, match="use predict_masks"):
        predict(out, images)
    with pytest.raises(ValueError, match="cannot resume the run .* task='segment' \\(now 'classify'\\)"):
        finetune(ARCH, small_shapes, task="classify", size=SIZE, epochs=2, bs=8, lr=3e-3, out=out, resume=True,
                 progress=False)


def test_the_commands_segment_a_folder_and_write_masks(tmp_path, capsys):
    root = _mask_folder(tmp_path / "set", n=16)
    out = tmp_path / "run"
    assert cli.main(["finetune", "--task", "segment", "--data", str(root), "--size", str(SIZE), "--epochs", "1",
                     "--bs", "4", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / checkpoint.MODEL_META).read_text())
    assert meta["arch"] == ARCH and meta["classes"] == ["background", "square", "bar"]
    images = sorted((root / "images").iterdir())[:2]
    capsys.readouterr()
    predictions = tmp_path / "pred"
    assert cli.main(["predict", str(out), *map(str, images), "--out-dir", str(predictions), "--overlay", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    for record, image in zip(records, images):
        written = read_mask(record["mask"])
        assert written.shape == (20, 24) and Path(record["mask"]).name == f"{image.stem}.png"
        (expected,) = predict_masks(out, [Image.open(image).convert("RGB")])
        np.testing.assert_array_equal(written, expected)
        assert record["classes"] == pytest.approx(class_shares(expected, meta["classes"]))
        assert Image.open(record["overlay"]).size == (24, 20)


def test_a_classifier_checkpoint_refuses_overlay_and_masks(tmp_path, capsys):
    from autocut.finetune.data import Tensors

    data = Data(Tensors(torch.randn(16, 3, 16, 16), torch.arange(16) % 2), Tensors(torch.randn(4, 3, 16, 16),
                torch.arange(4) % 2), ["a", "b"], "random")
    finetune("resnet10t", data, size=16, epochs=1, bs=8, out=tmp_path / "run", progress=False)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    assert cli.main(["predict", str(tmp_path / "run"), str(img), "--overlay"]) == 2
    assert "--overlay draws a segmentation's masks" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a segmentation checkpoint"):
        predict_masks(tmp_path / "run", [img])


def test_saved_masks_hold_class_indices_and_a_palette(tmp_path):
    mask = np.array([[0, 1], [2, 4]], dtype=np.uint8)
    path = save_mask(mask, tmp_path / "m.png", 5)
    with Image.open(path) as im:
        assert im.mode == "P" and tuple(im.getpalette()[3:6]) == tuple(palette(5)[1])
    np.testing.assert_array_equal(read_mask(path), mask)
    assert palette(4).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]  # VOC's first colours


def test_segment_needs_two_classes(tmp_path):
    one = Data(MaskTensors(torch.zeros(8, 3, 16, 16), torch.zeros(8, 16, 16, dtype=torch.long)),
               MaskTensors(torch.zeros(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long)), ["background"], "one")
    with pytest.raises(ValueError, match="one has 1 class: a segmentation needs at least 2"):
        finetune(ARCH, one, task="segment", size=16, epochs=1, bs=4, progress=False)
    with pytest.raises(ValueError, match="task must be one of classify, segment"):
        finetune(ARCH, one, task="detect", size=16, epochs=1, bs=4, progress=False)


def test_an_interrupted_segmentation_resumes_to_the_uninterrupted_run(tmp_path):
    # each run gets its own set, as a new process would: the resumed one must draw epoch 1's images
    options = dict(task="segment", size=SIZE, epochs=2, bs=16, progress=False)

    def drawn():
        return shapes_data(size=SIZE, n=48, seed=3, redraw=True)

    straight, straight_history = finetune(ARCH, drawn(), out=tmp_path / "a", **options)

    def ctrl_c(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(ARCH, drawn(), out=tmp_path / "b", on_epoch_end=ctrl_c, **options)
    resumed, resumed_history = finetune(ARCH, drawn(), out=tmp_path / "b", resume=True, **options)
    assert [(r["train_loss"], r["miou"]) for r in straight_history] == [(r["train_loss"], r["miou"]) for r in resumed_history]
    mine, theirs = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
