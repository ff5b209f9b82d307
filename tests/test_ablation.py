"""The ablation statistics and table (entityclip_hf.ablation) and examples/ablate.py's runner."""

import json
import math
import sys
from pathlib import Path

import pytest

from entityclip_hf.ablation import comparison_table, mean_std, paired_differences, summarize_arms

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

RESULTS = {
    "plain": {0: {"R@1": 40.0}, 1: {"R@1": 50.0}, 2: {"R@1": 45.0}},
    "variant": {0: {"R@1": 46.0}, 1: {"R@1": 57.0}, 2: {"R@1": 50.0}},
    "noisy": {0: {"R@1": 50.0}, 1: {"R@1": 40.0}, 2: {"R@1": 51.0}},
}


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert mean_std([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_differences_are_per_seed():
    assert paired_differences(RESULTS["variant"], RESULTS["plain"], "R@1") == [6.0, 7.0, 5.0]
    with pytest.raises(ValueError, match="no seed in common"):
        paired_differences({9: {"R@1": 1.0}}, RESULTS["plain"], "R@1")


def test_summary_marks_a_difference_clear_only_above_twice_its_spread():
    summary = summarize_arms(RESULTS, ["R@1"], baseline="plain")
    variant = summary["variant"]["R@1"]
    assert variant["mean"] == pytest.approx(51.0) and variant["std"] == pytest.approx(math.sqrt(31))
    # Paired: +6, +7, +5 -> mean 6, std 1: clear, although the arms' own spreads (5 and 5.6) overlap.
    assert variant["diff_mean"] == pytest.approx(6.0) and variant["diff_std"] == pytest.approx(1.0)
    assert variant["clear"] is True
    noisy = summary["noisy"]["R@1"]  # +10, -10, +6: mean 2, std 10.6
    assert noisy["diff_mean"] == pytest.approx(2.0) and noisy["clear"] is False
    assert "diff_mean" not in summary["plain"]["R@1"]


def test_comparison_table_cells():
    table = comparison_table(RESULTS, ["R@1"], baseline="plain")
    lines = table.splitlines()
    assert lines[0] == "| arm | seeds | R@1 | Δ R@1 |"
    assert lines[2] == "| plain | 3 | 45.0 ± 5.0 | (baseline) |"
    assert lines[3] == "| variant | 3 | 51.0 ± 5.6 | **+6.0 ± 1.0** |"
    assert lines[4].endswith("| +2.0 ± 10.6 |")


def test_ablate_reads_finished_runs_and_prints_the_table(tmp_path, capsys, monkeypatch):
    for arm, by_seed in (("plain", RESULTS["plain"]), ("entityclip", RESULTS["variant"])):
        for seed, metrics in by_seed.items():
            folder = tmp_path / arm / f"seed{seed}"
            folder.mkdir(parents=True)
            test = {"i2t_R@1": metrics["R@1"], "t2i_R@1": metrics["R@1"] + 2, "rsum": 3 * metrics["R@1"]}
            (folder / "results.json").write_text(json.dumps({"final": test, "test": test}))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("ablate", None)
    import ablate

    summary = ablate.main(["--output_dir", str(tmp_path), "--arms", "plain", "entityclip", "--seeds", "0", "1", "2"])
    out = capsys.readouterr().out
    assert "| entityclip | 3 |" in out and "**+6.0 ± 1.0**" in out, "R@1 = mean of both directions, paired"
    assert summary["summary"]["entityclip"]["R@1"]["diff_mean"] == pytest.approx(6.0)
    assert json.loads((tmp_path / "ablation.json").read_text())["seeds"] == [0, 1, 2]
    assert ablate.parse_arm("mine=--beta 0.5 --gamma 0") == ("mine", ["--beta", "0.5", "--gamma", "0"])
    assert ablate.parse_arm("plain") == ("plain", ["--beta", "0", "--gamma", "0"])
    with pytest.raises(SystemExit):
        ablate.parse_arm("nonsense")
