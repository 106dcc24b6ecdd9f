"""The command line: `autocut inspect` as a person and as a machine reads it."""

import json
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "autocut", *args], capture_output=True, text=True, timeout=300)


def test_inspect_prints_the_cut_and_the_groups():
    proc = _run("inspect", "torchvision:resnet34")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "layer4" in out and "512" in out and "fc" in out and "1024 (concat pool" in out
    assert "layer3" in out and "layer groups" in out
    assert "end of module" in out


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
