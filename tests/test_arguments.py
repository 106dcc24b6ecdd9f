"""Argument checks (``autocut._validate``): every public argument is checked in one place, at the
call; a bad one is refused with a message naming it and what to pass, a good one of any numeric
type comes back as a plain ``int`` or ``float``."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import autocut
from autocut import _validate, cli
from autocut.finetune import train

from handmade import FunctionalPoolNet

# --- the checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3)])
def test_any_integral_number_is_an_int(value):
    assert type(_validate.positive_int("n", value)) is int and _validate.positive_int("n", value) == 3
    assert _validate.integer("n", np.int64(-3)) == -3 and _validate.integer("n", 0) == 0


@pytest.mark.parametrize(("value", "shown"), [
    (0, "0 (int)"), (-2, "-2 (int)"), (2.5, "2.5 (float)"), (3.0, "3.0 (float)"), (True, "True (bool)"),
    (np.bool_(True), "np.True_ (bool)"), ("3", "'3' (str)"), (None, "None (NoneType)"),
    (torch.tensor(3.0), "tensor(3.) (Tensor)"),
])
def test_anything_else_is_no_positive_int(value, shown):
    message = f"width must be a positive int, got {shown}: pass a whole number >= 1 such as 3"
    with pytest.raises(autocut.CutError, match=f"^{re.escape(message)}$"):
        _validate.positive_int("width", value)


@pytest.mark.parametrize(("interval", "inside", "outside"), [
    ("(0, 1]", [1e-300, 0.5, 1, np.float32(1.0)], [0, -0.5, 1.0000001, math.nan, math.inf, True, "0.5", None]),
    ("[0, 1)", [0, 0.0, 0.999], [1, -1e-300, math.nan]),
    ("[0, inf)", [0, 1e300], [math.inf, -math.inf, math.nan, -1]),
    ("(-inf, inf)", [-1e300, 0], [math.inf, -math.inf, math.nan]),
])
def test_number_is_inside_the_interval_and_never_nan(interval, inside, outside):
    for x in inside:
        assert _validate.number("x", x, interval) == float(x) and type(_validate.number("x", x, interval)) is float
    for x in outside:
        with pytest.raises(autocut.CutError, match=f"^{re.escape(f'x must be a number in {interval}, got ')}"):
            _validate.number("x", x, interval)


def test_learning_rates_come_back_as_floats_or_slices_of_floats():
    assert _validate.learning_rates("lr", 1) == 1.0 and type(_validate.learning_rates("lr", np.float32(0.5))) is float
    assert _validate.learning_rates("lr", slice(np.float64(1e-5), 1)) == slice(1e-5, 1.0)
    assert _validate.learning_rates("lr", slice(1e-3)) == slice(None, 1e-3, None)
    assert _validate.learning_rates("lr", slice(1e-3, 1e-3)) == slice(1e-3, 1e-3)


@pytest.mark.parametrize(("value", "default", "size"), [
    (64, (3, 224, 224), (3, 64, 64)),
    (np.int64(64), (1, 28, 28), (1, 64, 64)),
    ((3, np.int64(32), 48), None, (3, 32, 48)),
    ([1, 32, 48], (3, 224, 224), (1, 32, 48)),
    (None, [3, 224, 224], (3, 224, 224)),
    (64, None, None),  # checked before the model is built, its channels not known yet
])
def test_input_size_is_c_h_w_or_one_side(value, default, size):
    got = _validate.input_size(value, default)
    assert got == size and (got is None or all(type(d) is int for d in got))


@pytest.mark.parametrize("value", [0, -64, 64.0, True, (224, 224), (3, 0, 32), (3, 32.0, 32), (True, 32, 32), "3x32x32"])
def test_a_bad_input_size_says_what_to_pass(value):
    with pytest.raises(autocut.CutError, match=r"^input_size must be \(C, H, W\) positive ints or one positive int for a square "
                                               r"image, got .*: pass \(3, 224, 224\) or 224$"):
        _validate.input_size(value, (3, 224, 224))


# --- adapt and create_body --------------------------------------------------------------------


def test_numpy_sizes_and_one_int_input_size_adapt_as_plain_ints():
    model = autocut.adapt(FunctionalPoolNet(), n_out=np.int64(5), input_size=np.int64(32), n_in=np.int64(1))
    assert model.cut.input_size == (1, 32, 32) and model[1][-1].out_features == 5
    assert type(model[1][-1].out_features) is int
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    named = autocut.adapt("resnet18", n_out=2, input_size=48)
    assert named.cut.input_size == (3, 48, 48) and named.cut.feature_shape == (512, 2, 2)
    body = autocut.create_body(FunctionalPoolNet(), input_size=24)
    assert body.cut.input_size == (3, 24, 24) and body(torch.randn(1, 3, 24, 24)).shape == (1, 16, 6, 6)


@pytest.mark.parametrize(("options", "message"), [
    ({"n_out": np.int64(0)}, r"^n_out must be a positive int, got np\.int64\(0\) \(int64\)"),
    ({"n_out": 2.5}, r"^n_out must be a positive int, got 2\.5 \(float\)"),
    ({"n_out": True}, r"^n_out must be a positive int, got True \(bool\)"),
    ({"n_in": 2.5}, r"^n_in must be a positive int, got 2\.5 \(float\)"),
    ({"n_in": 0}, r"^n_in must be a positive int, got 0 \(int\)"),
    ({"custom_head": "x"}, r"^custom_head must be an nn\.Module \(the head, taking the body's \(B, nf, h, w\) map\) or None, "
                           r"got 'x' \(str\)$"),
    ({"custom_head": [nn.Linear(2, 2)]}, r"^custom_head must be an nn\.Module .* got \[Linear"),
    ({"init": "bogus"}, r"^init must be a callable \(called on each weight tensor of the head, such as "
                        r"nn\.init\.kaiming_normal_\) or None, got 'bogus' \(str\)$"),
    ({"input_size": 0}, r"^input_size must be \(C, H, W\) positive ints or one positive int"),
    ({"input_size": (3, 64)}, r"^input_size must be \(C, H, W\) positive ints or one positive int"),
])
def test_a_bad_argument_to_adapt_is_refused_before_the_model_is_built(options, message):
    args = {"n_out": 2, **options}
    with pytest.raises(autocut.CutError, match=message):
        autocut.adapt("no_such_model_at_all", **args)  # refused before the name is even looked up


def test_head_options_reach_create_heads_checks():
    with pytest.raises(autocut.CutError, match=r"^lin_ftrs\[0\] must be a positive int, got 0 \(int\)"):
        autocut.adapt(FunctionalPoolNet(), n_out=2, input_size=32, lin_ftrs=[0])


def test_create_body_checks_input_size_and_n_in_before_the_build():
    with pytest.raises(autocut.CutError, match=r"^input_size must be \(C, H, W\) positive ints or one positive int"):
        autocut.create_body("no_such_model_at_all", input_size=(3, 64))
    with pytest.raises(autocut.CutError, match=r"^n_in must be a positive int, got 3\.0 \(float\)"):
        autocut.create_body("no_such_model_at_all", n_in=3.0)


# --- finetune: a rate that cannot train is refused before any epoch ----------------------------


@pytest.fixture
def no_training(monkeypatch):
    def trained(*args, **kwargs):
        raise AssertionError("an epoch ran")

    monkeypatch.setattr(train, "_train_epoch", trained)


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "nan"], r"argument --lr: must be a number above 0, got nan$"),
    (["--lr", "inf"], r"argument --lr: must be a number above 0, got inf$"),
    (["--pretrained", "--lr-mult", "0.5"], r"argument --lr-mult: must be a number of 1 or more, got 0\.5$"),
    (["--lr-mult", "0"], r"argument --lr-mult: must be a number of 1 or more, got 0$"),
    (["--lr-mult", "nan"], r"argument --lr-mult: must be a number of 1 or more, got nan$"),
])
def test_the_command_refuses_a_rate_that_cannot_train_with_exit_2(flags, message, no_training, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["finetune", "--size", "16", "--epochs", "1", "--bs", "32", "--device", "cpu", "--quiet", *flags])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


@pytest.mark.parametrize(("lr", "lr_mult", "message"), [
    (float("nan"), None, r"^lr must be a number above 0, got nan$"),
    (1e-3, 0.5, r"^lr_mult must be a number of 1 or more, got 0\.5$"),
])
def test_finetune_refuses_a_rate_that_cannot_train_before_any_epoch(lr, lr_mult, message, no_training, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.finetune(size=16, epochs=1, bs=32, lr=lr, lr_mult=lr_mult, pretrained=False, out=tmp_path / "run",
                       device="cpu", progress=False)
