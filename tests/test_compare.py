"""flatlib.tools.compare: a rerun's figures against the committed ones, in units of each number's own SE."""

import json
import subprocess

import pandas as pd
import pytest

from flatlib.tools import reproduce
from flatlib.tools.compare import compare, compare_frames, format_comparison, main, read_csv, uncertainties

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
    monkeypatch.setattr("flatlib.tools.compare.figures_dir", lambda profile: repo)
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


# ---------------------------------------------------------------------------------------------------
# damaged files: named, left out, the rest compared, exit status 3

def test_a_truncated_claims_file_is_named_and_everything_else_still_compared(repo, monkeypatch, capsys):
    """It used to drop the whole comparison with "cannot compare: Expecting ',' delimiter" naming no file."""
    frame = pd.read_csv(repo / "02_measurements.csv")
    frame.loc[0, "gap"] = 0.0083
    frame.to_csv(repo / "02_measurements.csv", index=False)
    path = repo / "claims" / "02_x.json"
    path.write_text(claims("no")[:60])
    (repo / "claims" / "_runs.json").write_text('{"02_x": {"ok": tr')  # wall times: never compared
    result = compare(repo, "HEAD")
    (damaged,) = result.damaged
    assert damaged.startswith(f"{path}: not valid JSON")
    assert [f.status for f in result.files] == ["changed"] and result.files[0].changes  # still compared
    assert result.verdicts == []  # its claims are left out on both sides, not reported as gone
    text = format_comparison(result)
    assert "!! 1 DAMAGED FILE(S)" in text and str(path) in text and "gone" not in text
    monkeypatch.setattr("flatlib.tools.compare.figures_dir", lambda profile: repo)
    assert main([]) == 3 and main(["--strict"]) == 3
    assert str(path) in capsys.readouterr().out


def test_a_damaged_committed_claims_file_is_named_with_its_revision(repo):
    path = repo / "claims" / "02_x.json"
    path.write_text("{")
    git(repo.parent, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "damaged")
    path.write_text(claims("yes"))
    (damaged,) = compare(repo, "HEAD").damaged
    assert damaged.startswith("figures/claims/02_x.json at HEAD: not valid JSON") and "--against" in damaged


def test_a_claim_without_held_is_a_damaged_file_not_a_changed_verdict(repo, monkeypatch, capsys):
    """It used to exit 1 with a KeyError traceback, like a changed verdict under --strict."""
    data = json.loads(claims("yes"))
    del data["claims"][1]["held"]
    (repo / "claims" / "02_x.json").write_text(json.dumps(data))
    result = compare(repo, "HEAD")
    assert result.verdicts == [] and "claim 2 ('gap is small') has no 'held'" in result.damaged[0]
    monkeypatch.setattr("flatlib.tools.compare.figures_dir", lambda profile: repo)
    assert main(["--strict"]) == 3
    assert "has no 'held'" in capsys.readouterr().out


def test_an_unreadable_csv_is_a_damaged_file_named_with_its_side(repo):
    (repo / "02_measurements.csv").write_bytes(b"a,b\n\xff\xfe,\x00\n")
    result = compare(repo, "HEAD")
    assert result.files[0].status.startswith("unreadable")
    assert len(result.damaged) == 1 and str(repo / "02_measurements.csv") in result.damaged[0]


# ---------------------------------------------------------------------------------------------------
# interval columns named low / high, and the relative floor

VERDICT = """continuation,language,quantity,effect,low,high,lineages,verdict,flow,below
sgd clock,hmm,trace,-8.99,-12.63,-5.35,3,yes,1.0,2.0
"""


def test_bare_low_and_high_columns_are_the_interval_of_the_column_before_them():
    assert uncertainties(["effect", "low", "high", "lineages", "flow", "below"]) == {
        "effect": (["low", "high"], "CI")}  # 'flow' and 'below' end in 'low' but are values
    assert uncertainties(["before", "after", "delta", "low", "high", "verdict", "spearman", "spearman low",
                          "spearman high"]) == {"delta": (["low", "high"], "CI"),
                                                "spearman": (["spearman low", "spearman high"], "CI")}


def test_an_effect_moved_by_its_whole_ci_is_beyond_its_uncertainty():
    """It showed as "+40% relative, 0 beyond 95%" (the effect had no uncertainty)."""
    ref = read_csv(VERDICT)
    new = ref.copy()
    new.loc[0, "effect"] = -8.99 + 3.64  # moved by the CI's half width: 1.96 SE
    new.loc[0, "flow"] = 1.1
    diff = compare_frames("02_verdict.csv", ref, new)
    by = {c.column: c for c in diff.changes}
    assert by["effect"].from_ci and by["effect"].se == pytest.approx(3.64 / 1.96)
    assert by["effect"].sigmas == pytest.approx(1.96)
    assert by["flow"].sigmas is None  # no uncertainty: a relative difference
    new.loc[0, "effect"] = -8.99 + 7.28  # the whole CI's width
    assert compare_frames("02_verdict.csv", ref, new).beyond == 1


def test_differences_within_the_relative_floor_are_equal_whatever_their_se(repo, monkeypatch, capsys):
    """A 9e-16 difference on a value whose SE is 5e-18 (a degenerate CI) was flagged at +178 SE."""
    ref = read_csv("language,tokens,trace,trace_se\nhmm,10000000000,1.0,5e-18\npcfg,7,2.0,0.1\n")
    new = ref.copy()
    new.loc[0, "trace"] = 1.0 + 9e-16
    new.loc[0, "tokens"] = 10000000001  # a count is exact: a changed count is a change, however small
    diff = compare_frames("x.csv", ref, new)
    assert diff.within_floor == 1 and [c.column for c in diff.changes] == ["tokens"]
    no_floor = {c.column: c for c in compare_frames("x.csv", ref, new, floor=0.0).changes}
    assert no_floor["trace"].sigmas == pytest.approx(((1.0 + 9e-16) - 1.0) / 5e-18)  # 4 ulp: +178 SE
    new.loc[1, "trace"] = 2.0 * (1 + 2e-9)  # beyond the floor: compared in SE units as before
    assert [c.row for c in compare_frames("x.csv", ref, new).changes if c.column == "trace"] == ["pcfg"]
    with pytest.raises(ValueError, match="floor"):
        compare_frames("x.csv", ref, new, floor=-1.0)
    # in the repo: only float noise left, reported as no difference, with how many were within the floor
    frame = pd.read_csv(repo / "02_measurements.csv")
    frame.loc[0, "trace"] = 18.0 * (1 + 4e-16)
    frame.to_csv(repo / "02_measurements.csv", index=False)
    result = compare(repo, "HEAD")
    assert not result.changed
    assert "1 number(s) differ by at most 1e-09 of their value" in format_comparison(result)
    monkeypatch.setattr("flatlib.tools.compare.figures_dir", lambda profile: repo)
    assert main(["--floor", "0"]) == 0 and "1 of 10 numbers differ" in capsys.readouterr().out
    assert main(["--floor", "-1"]) == 2 and "floor: expected a relative difference" in capsys.readouterr().err
