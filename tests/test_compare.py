"""flatlib.compare: a rerun's figures against the committed ones, in units of each number's own SE."""

import json
import subprocess

import pandas as pd
import pytest

from flatlib import reproduce
from flatlib.compare import compare, compare_frames, format_comparison, main, read_csv, uncertainties

MEASUREMENTS = """language,seed,step,gap,gap_se,acc,acc ci95,trace
hmm,0,0,0.0080,0.0002,0.650,0.0196,18.0
hmm,1,0,0.0090,0.0002,0.660,0.0196,20.0
"""


def claims(held: str) -> str:
    return json.dumps({"notebook": "02_x", "profile": "cpu", "claims": [
        {"claim": "trace falls", "paper": "", "ours": "", "held": held, "notebook": "02_x"},
        {"claim": "gap is small", "paper": "", "ours": "", "held": "yes", "notebook": "02_x"}]})


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path):
    """A git repo whose figures/ holds one CSV and one claims file, committed."""
    figures = tmp_path / "figures"
    (figures / "claims").mkdir(parents=True)
    (figures / "02_measurements.csv").write_text(MEASUREMENTS)
    (figures / "claims" / "02_x.json").write_text(claims("yes"))
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "figures")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "figures")
    return figures


def test_uncertainty_columns_follow_the_notebooks_naming():
    columns = ["MLM optimum", "MLM ± se", "gap", "gap_se", "raw trace", "raw trace se", "lookup probe",
               "lookup ci95", "spearman", "spearman low", "spearman high", "z"]
    assert uncertainties(columns) == {"MLM optimum": (["MLM ± se"], "SE"), "gap": (["gap_se"], "SE"),
                                      "raw trace": (["raw trace se"], "SE"),
                                      "lookup probe": (["lookup ci95"], "CI"),
                                      "spearman": (["spearman low", "spearman high"], "CI")}


def test_differences_in_units_of_their_own_se():
    ref = read_csv(MEASUREMENTS)
    new = ref.copy()
    new.loc[0, "gap"] = 0.0083      # +0.0003 with SE 0.0002: 1.5 SE
    new.loc[1, "acc"] = 0.640       # -0.020 with a CI half-width of 0.0196 = 1.96 * 0.01: -2 SE
    new.loc[1, "trace"] = 22.0      # no uncertainty: +10%
    diff = compare_frames("02_measurements.csv", ref, new)
    by = {(c.row, c.column): c for c in diff.changes}
    assert diff.status == "changed" and len(diff.changes) == 3 and not diff.rows_missing
    assert by[("hmm · 0 · 0", "gap")].sigmas == pytest.approx(1.5)
    assert by[("hmm · 1 · 0", "acc")].sigmas == pytest.approx(-2.0) and by[("hmm · 1 · 0", "acc")].from_ci
    assert by[("hmm · 1 · 0", "trace")].sigmas is None
    assert by[("hmm · 1 · 0", "trace")].relative == pytest.approx(0.1)
    assert diff.beyond == 1  # only the -2 SE change is outside the 95% uncertainty


def test_plus_minus_cells_are_a_value_and_its_ci():
    ref = read_csv('model,trace\nsgd,18.5 ± 7.4\nlookup,(no parameters)\n')
    new = read_csv('model,trace\nsgd,14.4 ± 7.4\nlookup,(no parameters)\n')
    (change,) = compare_frames("04_table.csv", ref, new).changes
    assert change.column == "trace" and change.sigmas == pytest.approx(-4.1 / (7.4 / 1.96))


def test_rows_align_by_their_labels_and_a_changed_count_is_a_change_not_a_new_row():
    ref = read_csv("language,tokens,loss\nhmm,100,1.0\npcfg,200,2.0\n")
    new = read_csv("language,tokens,loss\npcfg,210,2.0\nhmm,100,1.0\nteacher,50,3.0\n")
    diff = compare_frames("01.csv", ref, new)
    assert diff.rows_new == ["teacher"] and diff.rows_missing == []
    assert [(c.row, c.column, c.ref, c.new) for c in diff.changes] == [("pcfg", "tokens", 200, 210)]


def test_identical_tree_reports_no_change(repo):
    result = compare(repo, "HEAD")
    assert not result.changed and result.reference_files == 2
    assert [f.status for f in result.files] == ["same"]
    assert "No differences" in format_comparison(result)


def test_verdict_change_is_flagged_and_strict_fails(repo, monkeypatch):
    (repo / "claims" / "02_x.json").write_text(claims("no"))
    result = compare(repo, "HEAD")
    assert [(v.claim, v.ref, v.new) for v in result.verdicts] == [("trace falls", "yes", "no")]
    assert "!! 1 CLAIM VERDICT(S) CHANGED" in format_comparison(result)
    monkeypatch.setattr("flatlib.compare.figures_dir", lambda profile: repo)
    assert main(["--strict"]) == 1
    assert main([]) == 0


def test_missing_new_and_changed_files_are_reported(repo):
    (repo / "02_measurements.csv").unlink()
    (repo / "03_new.csv").write_text("a,b\n1,2.0\n")
    result = compare(repo, "HEAD")
    assert {f.name: f.status for f in result.files} == {"02_measurements.csv": "missing", "03_new.csv": "new"}
    text = format_comparison(result)
    assert "MISSING" in text and "NEW" in text


def test_a_changed_number_shows_in_the_report(repo):
    frame = pd.read_csv(repo / "02_measurements.csv")
    frame.loc[0, "gap"] = 0.0083
    frame.to_csv(repo / "02_measurements.csv", index=False)
    text = format_comparison(compare(repo, "HEAD"))
    assert "1 of 10 numbers differ, 0 of them beyond" in text  # 5 measured columns x 2 rows
    assert "+1.50" in text  # the change in SE units, in the list of the largest


def test_not_a_git_checkout_is_an_error_that_reproduce_reports_without_failing(tmp_path, monkeypatch, capsys):
    (tmp_path / "figures").mkdir()
    with pytest.raises(RuntimeError, match="git"):
        compare(tmp_path / "figures", "HEAD")
    monkeypatch.setattr(reproduce, "figures_dir", lambda profile: tmp_path / "figures")
    reproduce.print_comparison("cpu")
    assert "comparison skipped: RuntimeError" in capsys.readouterr().out


def test_a_ci_from_low_and_high_bounds_is_its_half_width():
    ref = read_csv("family,spearman,spearman low,spearman high\n2x64,-0.47,-0.75,0.09\n")
    new = read_csv("family,spearman,spearman low,spearman high\n2x64,-0.05,-0.75,0.09\n")
    (change,) = compare_frames("05.csv", ref, new).changes
    assert change.from_ci and change.se == pytest.approx(0.42 / 1.96)
    assert change.sigmas == pytest.approx(0.42 / (0.42 / 1.96))
