"""The embedded segmentation set (``autocut.finetune.shapes``): the same for a seed, every class
in it, and masks that mark what the images show."""

import numpy as np
import pytest

from autocut.finetune.shapes import CLASSES, shapes


def test_the_same_seed_makes_the_same_set_and_another_seed_another():
    images, masks = shapes(6, size=32, seed=1)
    again = shapes(6, size=32, seed=1)
    assert np.array_equal(images, again[0]) and np.array_equal(masks, again[1])
    other = shapes(6, size=32, seed=2)
    assert not np.array_equal(images, other[0]) and not np.array_equal(masks, other[1])
    assert np.array_equal(shapes(3, size=32, seed=1)[1], masks[:3])  # a prefix of a longer set


def test_images_and_masks_have_their_shapes_and_every_class():
    images, masks = shapes(40, size=48, seed=0)
    assert (images.shape, images.dtype, masks.shape, masks.dtype) == ((40, 48, 48, 3), np.uint8, (40, 48, 48), np.int64)
    assert set(np.unique(masks)) == set(range(len(CLASSES)))
    assert CLASSES[0] == "background" and (masks == 0).mean() > 0.5  # shapes on a background
    per_image = [len(np.unique(m)) - 1 for m in masks]  # classes other than the background
    assert max(per_image) >= 3 and min(per_image) >= 1


def test_a_mask_marks_pixels_that_differ_from_the_background_around_them():
    # one shape per image: its pixels' mean colour stands out from the background's
    images, masks = shapes(100, size=48, seed=3, max_shapes=1)
    for image, mask in zip(images.astype(float), masks):
        shape, background = mask > 0, mask == 0
        assert shape.any() and background.any()
        assert np.linalg.norm(image[shape].mean(0) - image[background].mean(0)) > 30


def test_a_shapes_colour_says_nothing_of_its_class():
    images, masks = shapes(200, size=32, seed=4, max_shapes=1)
    means = {k: [images[i][masks[i] == k].mean(0) for i in range(200) if (masks[i] == k).sum() > 10]
             for k in range(1, len(CLASSES))}
    for k, colours in means.items():
        assert np.std(colours, axis=0).min() > 40, CLASSES[k]  # colours spread over the whole range


@pytest.mark.parametrize("kwargs, message", [({"size": 8}, "size must be at least 16 pixels .*got 8"),
                                             ({"n": 0}, "n must be a positive int, got 0"),
                                             ({"max_shapes": 0}, "max_shapes must be a positive int, got 0")])
def test_bad_arguments_are_refused_with_what_was_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shapes(**{"n": 2, "size": 32, **kwargs})
