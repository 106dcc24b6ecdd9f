"""A scan's feature pyramids (``autocut.scan.pyramids``): what each model's record says of its
pyramid, against the levels the zoo's own code states (timm's ``feature_info``, torchvision's
detection backbones), every outcome of the check, and how the report and ``model_meta.json`` show it."""

import json

import pytest
import timm
import torch

from autocut.scan import check, pyramids
from autocut.scan.pyramids import check_pyramid, pyramid_differences


def _stated(name):
    """timm's own feature_info, as the record lists it."""
    info = timm.create_model(name, features_only=True, pretrained=False).feature_info.get_dicts()
    return [[d["module"], float(d["reduction"]), d["num_chs"]] for d in info]


def test_a_checked_model_records_its_levels_and_timms_stated_ones():
    record = check.check_model("resnet18")
    assert record["pyramid_oracle"] == "timm features_only"
    assert record["pyramid_expected"] == _stated("resnet18")
    assert [(level["where"], level["after"], level["nf"], level["stride"], level["layout"]) for level in record["pyramid"]] == [
        ("act1", "act1", 64, 2, "NCHW"), ("layer1.1.act2", "layer1", 64, 4, "NCHW"), ("layer2.1.act2", "layer2", 128, 8, "NCHW"),
        ("layer3.1.act2", "layer3", 256, 16, "NCHW"), ("layer4.1.act2", "layer4", 512, 32, "NCHW")]
    assert (record["pyramid_check"], record["pyramid_on"]) == ("agree", "meta")
    assert "pyramid_diff" not in record and "pyramid" in record["times"]


@pytest.mark.parametrize("name, modules", [
    ("torchvision:resnet18", ["layer1", "layer2", "layer3", "layer4"]),
    ("torchvision:mobilenet_v3_large", ["features.1", "features.3", "features.6", "features.12", "features.16"]),
    ("torchvision:vgg11", ["features.1", "features.4", "features.9", "features.14", "features.19", "features.20"]),
])
def test_torchvisions_detection_backbones_are_the_oracle_of_its_models(name, modules):
    record = check.check_model(name)
    assert [module for module, _, _ in record["pyramid_expected"]] == modules
    assert record["pyramid_check"] == "agree"


def test_a_model_with_no_stated_levels_still_gets_its_pyramid_run():
    record = check.check_model("torchvision:densenet121")
    assert (record["pyramid_oracle"], record["pyramid_check"]) == (None, "no oracle")
    assert record["pyramid_no_oracle"] == "torchvision builds no detection or segmentation backbone from it"
    assert [level["stride"] for level in record["pyramid"]] == [2, 4, 8, 16, 32]
    convit = check.check_model("convit_tiny")  # one of the timm names with no features_only
    assert convit["pyramid_no_oracle"].startswith("timm has no features_only for it: RuntimeError: features_only not")
    assert [(level["stride"], level["layout"]) for level in convit["pyramid"]] == [(16, "NLC")] * 4


def test_a_model_with_no_cut_has_its_pyramid_refused_for_the_same_reason():
    record = check.check_model("crossvit_tiny_240")
    assert (record["status"], record["pyramid_check"]) == ("differs", "refused")
    assert record["pyramid_error"].startswith("no cut: crossvit_tiny_240 has no single feature map")
    assert "branches only meet after pooling" in record["pyramid_error"] and "pyramid" not in record


def test_a_difference_from_the_stated_levels_is_listed_level_by_level(monkeypatch):
    real = pyramids.pyramid_expected

    def one_off(spec, model, x):
        source, levels = real(spec, model, x)
        levels[2] = {**levels[2], "num_chs": 100}  # layer2 said to have 100 channels
        levels[3] = {**levels[3], "reduction": 12.0}  # and layer3 to be at stride 12
        return source, levels

    monkeypatch.setattr(pyramids, "pyramid_expected", one_off)
    record = check.check_model("resnet18")
    assert record["pyramid_check"] == "differ"
    assert record["pyramid_diff"] == ["stride 8: layer2 100 ch, autocut layer2.1.act2 128 ch",
                                      "layer3 at stride 12: no autocut level there"]


def test_the_last_stated_level_per_stride_counts_and_the_deepest_on_stride_only():
    levels = [{"where": "a", "nf": 8, "stride": 4}, {"where": "b", "nf": 16, "stride": 8},
              {"where": "cut", "nf": 99, "stride": [16, 16]}]
    stated = [{"module": "s1", "reduction": 4, "num_chs": 4}, {"module": "s1b", "reduction": 4, "num_chs": 8},
              {"module": "s2", "reduction": 8.5, "num_chs": 16}, {"module": "s3", "reduction": 16, "num_chs": 32}]
    assert pyramid_differences(levels, stated) == []  # 8.5 is 8 within 15%; the deepest's channels are the cut's
    assert pyramid_differences(levels, [*stated, {"module": "s4", "reduction": 32, "num_chs": 32}]) == [
        "stride 16: s3 32 ch, autocut cut 99 ch", "s4 at stride 32: no autocut level there"]
    deeper = [*levels[:2], {**levels[2], "nf": 32}, {"where": "conv", "nf": 64, "stride": 32}]
    assert pyramid_differences(deeper, stated) == []  # a cut after a last strided conv: deeper than timm's last
    wide = [{"where": "a", "nf": 8, "stride": [4, 8]}, levels[-1]]  # a map strided more along one axis
    assert pyramid_differences(wide, [{"module": "s", "reduction": [4, 8], "num_chs": 8}, stated[-1]]) == []
    assert pyramid_differences(wide, [{"module": "s", "reduction": [8, 4], "num_chs": 8}, stated[-1]]) == [
        "s at stride 8x4: no autocut level there"]


def test_timms_levels_are_what_its_feature_module_returns_and_a_stated_difference_is_noted():
    record = check.check_model("ecaresnet50d_pruned")  # pruned widths: feature_info states the unpruned ones
    assert record["pyramid_expected"] == [["act1", 2, 64], ["layer1", 4, 19], ["layer2", 8, 171], ["layer3", 16, 818],
                                          ["layer4", 32, 2022]]
    assert record["pyramid_oracle_note"] == ("feature_info states layer1: 256 ch at 4; layer2: 512 ch at 8; "
                                             "layer3: 1024 ch at 16; layer4: 2048 ch at 32")
    assert record["pyramid_check"] == "agree"
    assert "pyramid_oracle_note" not in check.check_model("resnet18")


class _WrongShapes(torch.nn.Module):
    def __init__(self, pyramid):
        super().__init__()
        self.pyramid, self.levels = pyramid, pyramid.levels

    def forward(self, x):
        maps = self.pyramid(x)
        return [m.permute(0, 2, 3, 1) for m in maps[:-1]] + maps[-1:]  # an NHWC leak


def test_a_pyramid_that_returns_other_than_its_levels_is_a_mismatch(monkeypatch):
    real = pyramids.create_pyramid
    monkeypatch.setattr(pyramids, "create_pyramid", lambda *a, **k: _WrongShapes(real(*a, **k)))
    record = check.check_model("resnet18")
    assert record["pyramid_check"] == "mismatch"
    assert record["pyramid_diff"][0].startswith("the pyramid returns [(3, 112, 112, 64), (3, 56, 56, 64)")


def test_a_pyramid_the_meta_model_cannot_run_is_run_on_a_real_copy_and_a_failure_there_is_recorded(monkeypatch):
    from autocut import zoo

    real = pyramids.create_pyramid

    def meta_fails(model, **kwargs):
        if next(model.parameters()).device.type == "meta":
            raise NotImplementedError("no meta kernel")
        return real(model, **kwargs)

    spec = zoo.resolve("resnet18")
    meta = zoo.build(spec, device="meta")
    monkeypatch.setattr(pyramids, "create_pyramid", meta_fails)
    record = check_pyramid(spec, meta, (3, 64, 64), lambda: zoo.build(spec, device="cpu"), real_needed=False)
    assert (record["pyramid_check"], record["pyramid_on"], len(record["pyramid"])) == ("agree", "cpu", 5)
    monkeypatch.setattr(pyramids, "create_pyramid", lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("no")))
    record = check_pyramid(spec, meta, (3, 64, 64), lambda: zoo.build(spec, device="cpu"), real_needed=False)
    assert (record["pyramid_check"], record["pyramid_error"]) == ("failed", "NotImplementedError: no")
    assert record["pyramid_expected"] == _stated("resnet18")  # what the zoo states is kept


def test_the_report_and_model_meta_show_each_pyramid(tmp_path):
    from autocut.scan.report import model_meta, render_report

    base = {"zoo": "timm", "family": "f", "status": "ok", "method": "fx", "times": {}, "where": "w", "nf": 8,
            "layout": "NCHW", "stride": 32, "prefix_tokens": 0, "input_size": [3, 64, 64]}
    levels = [{"where": "a", "after": "s1", "nf": 4, "stride": 4, "layout": "NCHW"},
              {"where": "w", "after": "", "nf": 8, "stride": 32, "layout": "NCHW"}]
    recs = {
        "ghostnet_100": {**base, "name": "ghostnet_100", "pyramid": levels, "pyramid_check": "differ",
                         "pyramid_diff": ["stride 16: blocks.5 80 ch, autocut blocks.6.4.add 112 ch"]},
        "b": {**base, "name": "b", "pyramid": levels, "pyramid_check": "agree"},
        "c": {**base, "name": "c", "pyramid_check": "refused", "pyramid_error": "no cut: c has branches"},
        "d": {**base, "name": "d", "pyramid": levels, "pyramid_check": "mismatch", "pyramid_diff": ["returns (1, 2)"]},
        "e": {**base, "name": "e"},  # an older scan's record
    }
    report = render_report(recs, [], plots=False)
    assert "| timm | 5 | 2 | 1 | 1 | 0 | 1 | 1 | 0 | 1 |" in report
    assert "| timm | f | 5 | 5 | 0 | 0 | 0 | ✓ | 2 | 1 of 2 |" in report  # the family's pyramid columns
    assert "  - ghostnet_100: stride 16: blocks.5 80 ch, autocut blocks.6.4.add 112 ch\n" in report
    assert pyramids.pyramid_explained("ghostnet_100") in report
    assert "- **1** × [refused] no cut: … has branches\n  - c\n" in report
    meta = model_meta(recs)
    assert meta["b"]["levels"] == [{"where": "a", "after": "s1", "nf": 4, "stride": 4},
                                   {"where": "w", "after": "", "nf": 8, "stride": 32}]
    assert "levels" not in meta["d"] and "levels" not in meta["c"] and "levels" not in meta["e"]
    json.dumps(meta)


def test_a_later_scan_without_values_keeps_the_values_of_the_same_cut():
    from autocut.scan.runner import carry_values

    before = {"status": "ok", "where": "w", "nf": 8, "stride": 32, "values": "equal", "values_max_diff": 0.0,
              "at": "2026-12-04T15:11:32"}
    rec = {"status": "ok", "where": "w", "nf": 8, "stride": 32, "pyramid_check": "agree"}
    assert carry_values(before, rec) == {**rec, "values": "equal", "values_max_diff": 0.0, "values_from": "2026-12-04T15:11:32"}
    assert carry_values({**before, "values_from": "earlier"}, rec)["values_from"] == "earlier"
    assert carry_values(before, {**rec, "where": "v"}) == {**rec, "where": "v"}  # another cut: nothing carried
    assert carry_values(before, {**rec, "values": "differ"})["values"] == "differ"


def test_a_resumed_scan_checks_again_the_records_of_an_autocut_without_pyramids():
    from autocut.scan.cli import _without_pyramid, _without_values

    assert _without_pyramid({"status": "ok"}) and _without_pyramid({"status": "differs"})
    assert not _without_pyramid({"status": "ok", "pyramid_check": "agree"})
    assert not _without_pyramid({"status": "failed"}) and not _without_pyramid({"status": "ok", "recheck_failed": "oom: "})
    assert _without_values({"status": "ok", "pyramid_check": "agree"})
    assert _without_values({"status": "differs"}) and not _without_values({"status": "differs", "pyramid_check": "refused"})


def test_a_hugging_face_model_cut_on_its_exported_graph_gets_its_pyramid_run():
    pytest.importorskip("transformers")
    record = check.check_model("transformers:resnet")
    assert [(level["where"], level["stride"]) for level in record["pyramid"]] == [
        ("resnet.embedder.embedder", 2), ("resnet.encoder.stages.0", 4), ("resnet.encoder.stages.1", 8),
        ("resnet.encoder.stages.2", 16), ("resnet.encoder:last_hidden_state", 32)]
    # the oracle: Hugging Face's own ResNetBackbone for the same config, every stage
    assert (record["pyramid_oracle"], record["pyramid_check"], record["pyramid_on"]) == (
        "transformers AutoBackbone", "agree", "meta")
    assert record["pyramid_expected"] == [["stem", 4, 64], ["stage1", 4, 256], ["stage2", 8, 512], ["stage3", 16, 1024],
                                          ["stage4", 32, 2048]]
    vit = check.check_model("transformers:vit")  # no backbone class: its pyramid runs, unchecked
    assert (vit["pyramid_check"], vit["pyramid_no_oracle"]) == (
        "no oracle", "transformers has no backbone for it (its config names no stages)")
