"""The command line: `autocut inspect` as a person and as a machine reads it."""

import json
import subprocess
import sys

import pytest


def _run(*args):
    return subprocess.run([sys.executable, "-m", "autocut", *args], capture_output=True, text=True, timeout=300)


def test_inspect_prints_the_cut_and_the_groups():
    proc = _run("inspect", "torchvision:resnet34")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "layer4" in out and "512" in out and "fc" in out and "1024 (concat pool" in out
    assert "layer3" in out and "layer groups" in out
    assert "end of module" in out
    assert "feature pyramid" in out and "layer1" in out


def test_inspect_json_lists_the_pyramid_levels():
    proc = _run("inspect", "resnet18", "--json")
    assert proc.returncode == 0, proc.stderr
    levels = json.loads(proc.stdout)["pyramid"]
    assert [(lv["after"], lv["nf"], lv["stride"]) for lv in levels] == [
        ("act1", 64, 2), ("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16), ("layer4", 512, 32)]
    assert levels[-1]["where"] == "layer4.1.act2" and levels[-1]["feature_shape"] == [512, 7, 7]


def test_inspect_json_is_machine_readable():
    proc = _run("inspect", "vit_tiny_patch16_224", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["nf"] == 192 and record["layout"] == "NLC" and record["prefix_tokens"] == 1
    assert record["feature_shape"] == [192, 14, 14] and record["after"] == "norm"
    assert [g["first"] for g in record["groups"]][-1] == "head" and len(record["groups"]) == 3


def test_inspect_unknown_model_fails_with_close_matches():
    proc = _run("inspect", "resnet343")
    assert proc.returncode == 2
    assert "close matches" in proc.stderr and "resnet34" in proc.stderr


def test_inspect_shows_groups_for_a_model_the_meta_device_cannot_run():
    # efficientvit's attention runs under torch.autocast, which meta tensors refuse: a CPU copy
    proc = _run("inspect", "efficientvit_b0", "--json")
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout)["groups"]
    assert [(g["first"], g["last"]) for g in groups] == [("stem", "stages.1"), ("stages.2", "stages.3"), ("head", "head")]
    assert "no layer groups" not in proc.stderr


# --- numeric options: one checker for every subcommand ----------------------------------------


def _options():
    """``(subcommand, action)`` for every option of every subcommand."""
    import argparse

    from autocut.cli import make_parser

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action) for name, parser in sub.choices.items() for action in parser._actions]


def test_every_numeric_option_of_every_subcommand_is_checked_by_a_bound():
    from autocut._validate import Bound

    numeric = [(name, a.option_strings or a.dest, a.type) for name, a in _options() if a.type in (int, float)
               or isinstance(a.type, Bound)]
    unchecked = [(name, option) for name, option, kind in numeric if not isinstance(kind, Bound)]
    assert not unchecked, f"int/float options without an autocut._validate bound: {unchecked}"
    assert {(name, option[0]) for name, option, _ in numeric} >= {
        ("inspect", "--input-size"), ("finetune", "--epochs"), ("finetune", "--bs"), ("finetune", "--lr"),
        ("predict", "--top-k"), ("scan", "--jobs"), ("scan", "--timeout"), ("scan", "--memory-limit-gb")}


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--epochs", "-1"], "argument --epochs: must be an integer of 0 or more, got -1"),
    (["finetune", "--bs", "0"], "argument --bs: must be an integer of 1 or more, got 0"),
    (["finetune", "--lr", "nan"], "argument --lr: must be a number above 0, got nan"),
    (["finetune", "--valid-pct", "1"], "argument --valid-pct: must be a number from 0 (excluded) to 1 (excluded), got 1"),
    (["finetune", "--ps", "1"], "argument --ps: must be a number from 0 to 1 (excluded), got 1"),
    (["finetune", "--size", "2.5"], "argument --size: must be an integer of 1 or more, got '2.5'"),
    (["predict", "run", "a.png", "--top-k", "-3"], "argument --top-k: must be an integer of 1 or more, got -3"),
    (["scan", "--jobs", "0"], "argument --jobs: must be an integer of 1 or more, got 0"),
    (["scan", "--timeout", "0"], "argument --timeout: must be a number above 0, got 0"),
    (["scan", "--memory-limit-gb", "-1"], "argument --memory-limit-gb: must be a number of 0 or more, got -1"),
    (["inspect", "--input-size", "3", "0", "32"], "argument --input-size: must be an integer of 1 or more, got 0"),
])
def test_a_bad_number_is_refused_with_the_option_and_what_to_pass(argv, message, capsys):
    from autocut.cli import make_parser

    with pytest.raises(SystemExit) as exit_:
        make_parser().parse_args(argv)  # parsed only: nothing runs, whatever the checks let through
    assert exit_.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith(f"error: {message}")
