"""The mutation-testing tools (benchmarks/mutation_sample.py, benchmarks/mutation_report.py) on a
made-up run: which mutants a sample may draw, and how the report scores a run and its sample."""

import importlib.util
import json
from pathlib import Path

import pytest
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    # by path: benchmarks/ on sys.path would shadow packages (its `kernels` is a name transformers imports)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mutation_report, mutation_sample = _load("mutation_report"), _load("mutation_sample")

# mutmut's exit codes: 1 killed, 0 survived, None not checked, -24 timeout
RUN = {"autocut.a.x_f__mutmut_1": 1, "autocut.a.x_f__mutmut_2": 0, "autocut.a.x_f__mutmut_3": None,
       "autocut.a.x_f__mutmut_4": -24, "autocut.a.x_f__mutmut_5": None, "autocut.a.x_f__mutmut_6": 0}


def _run(tmp_path: Path, codes: dict) -> Path:
    mutants = tmp_path / "mutants"
    (mutants / "autocut").mkdir(parents=True)
    (mutants / "autocut" / "a.py.meta").write_text(json.dumps({"exit_code_by_key": codes}))
    return mutants


@pytest.mark.parametrize("k,n", [(90, 100), (0, 12), (12, 12), (271, 300)])
def test_the_interval_is_wilsons(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = mutation_report.wilson(k, n)
    assert lo == pytest.approx(expected.low, abs=1e-4) and hi == pytest.approx(expected.high, abs=1e-4)


def test_a_sample_draws_only_unchecked_mutants_reproducibly_and_records_them(tmp_path, capsys):
    drawn = []
    for run in ("one", "two"):
        mutation_sample.main(["--mutants", str(_run(tmp_path / run, RUN)), "--size", "1", "--seed", "3"])
        drawn.append(capsys.readouterr().out.split())
    assert drawn[0] == drawn[1]  # the seed decides
    assert drawn[0][0] in ("autocut.a.x_f__mutmut_3", "autocut.a.x_f__mutmut_5")
    mutants = tmp_path / "one" / "mutants"
    assert (mutants / "sample.txt").read_text().split() == drawn[0]
    other = ({"autocut.a.x_f__mutmut_3", "autocut.a.x_f__mutmut_5"} - set(drawn[0])).pop()
    mutation_sample.main(["--mutants", str(mutants), "--size", "10", "--seed", "3"])  # more than are left: all
    assert capsys.readouterr().out.split() == [*drawn[0], other]
    assert (mutants / "sample.txt").read_text().split() == [*drawn[0], other]


def test_a_sample_of_nothing_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        mutation_sample.main(["--mutants", str(_run(tmp_path, RUN)), "--size", "0"])
    with pytest.raises(SystemExit):
        mutation_sample.main(["--mutants", str(tmp_path / "none"), "--size", "5"])


def test_the_report_scores_checked_mutants_and_the_sample_apart(tmp_path, monkeypatch):
    codes = {**RUN, "autocut.a.x_f__mutmut_3": 1, "autocut.a.x_f__mutmut_5": 0}  # 3 and 5 drawn, then run
    mutants = _run(tmp_path, codes)
    (mutants / "sample.txt").write_text("autocut.a.x_f__mutmut_3\nautocut.a.x_f__mutmut_5\n")
    survivors = tmp_path / "survivors.toml"  # 6 survives as an equivalent mutant: out of the score
    survivors.write_text('[[survivor]]\nmutants = ["a.x_f__mutmut_6"]\nkind = "equivalent"\nreason = "r"\n')
    monkeypatch.setattr(mutation_report, "SURVIVORS", survivors)
    monkeypatch.setattr(mutation_report, "mutated_line", lambda name: ("old", "new"))
    out = tmp_path / "mutation.md"
    mutation_report.main(["--mutants", str(mutants), "--out", str(out)])
    text = out.read_text()
    # killed 1, 3 and timeout 4 of the non-equivalent 1-5: 3 of 5; the sample: 3 killed, 5 not
    assert "**Score: 3 of 5 non-equivalent mutants checked killed (60.0%; target 90%).** 1 equivalent" in text
    assert "6 of 6 mutants are checked" in text
    lo, hi = mutation_report.wilson(1, 2)
    assert f"**Random sample: 1 of 2 non-equivalent mutants killed (50.0%; 95% interval {100 * lo:.1f}-{100 * hi:.1f}%)**" in text
    assert "| `autocut/a.py` | 6 | 2 | 1 | 3 | 0 | 1 | 0 | 60.0% |" in text
    assert "- `x_f__mutmut_2` (survived, **unexplained**): `old` → `new`. no reason recorded" in text


def test_members_of_an_earlier_sample_left_unchecked_come_first_and_count_towards_the_size(tmp_path, capsys):
    mutants = _run(tmp_path, RUN)
    (mutants / "sample.txt").write_text("autocut.a.x_f__mutmut_1\nautocut.a.x_f__mutmut_5\n")  # 1 checked, 5 not
    mutation_sample.main(["--mutants", str(mutants), "--size", "1", "--seed", "0"])
    assert capsys.readouterr().out.split() == ["autocut.a.x_f__mutmut_5"]
    mutation_sample.main(["--mutants", str(mutants), "--size", "2", "--seed", "0"])
    assert capsys.readouterr().out.split() == ["autocut.a.x_f__mutmut_5", "autocut.a.x_f__mutmut_3"]
    assert (mutants / "sample.txt").read_text().split()[-1] == "autocut.a.x_f__mutmut_3"
