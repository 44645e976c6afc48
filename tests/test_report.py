"""The claims report: claims recorded by notebooks, notebook runs merged, REPORT.md rendered."""

import pytest

from flatlib.tools.report import Claim, load_claims, record_claims, record_runs, render_report, write_report


@pytest.fixture()
def figures(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATLIB_FIGURES", str(tmp_path))
    return tmp_path


def claim(**kw):
    return Claim(**{"claim": "trace falls", "paper": "19.8 -> 12.6", "ours": "30 ± 2 -> 25 ± 2",
                    "held": "yes", "notebook": "03_model_size", "figure": "03_size.png", **kw})


def test_bad_claims_are_refused():
    with pytest.raises(ValueError, match="held"):
        claim(held="maybe")
    with pytest.raises(ValueError, match="claim"):
        claim(claim="")


def test_record_and_load_round_trip(figures):
    path = record_claims("smoke", "03_model_size", [claim(), claim(held="no", detail="hmm")])
    assert path.parent == figures / "smoke" / "claims"
    loaded = load_claims("smoke")
    assert list(loaded) == ["03_model_size"] and loaded["03_model_size"][1].held == "no"
    # recording again replaces, not appends
    record_claims("smoke", "03_model_size", [claim()])
    assert len(load_claims("smoke")["03_model_size"]) == 1
    with pytest.raises(ValueError, match="notebook"):
        record_claims("smoke", "a/b", [claim()])


def test_report_lists_claims_and_keeps_the_last_good_run(figures):
    record_claims("smoke", "03_model_size", [claim(ours="a | b")], parameters={"seeds": [0, 1]})
    record_runs("smoke", [{"notebook": "03_model_size.ipynb", "ok": True, "seconds": 60.0, "error": ""}])
    record_runs("smoke", [{"notebook": "03_model_size.ipynb", "ok": False, "seconds": 5.0, "error": "boom"}])
    text = render_report("smoke")
    assert "FAILED: boom" in text and "last good run" in text
    assert "a \\| b" in text  # table cells are escaped
    assert "**yes**" in text and "19.8 -> 12.6" in text and "seeds = `[0, 1]`" in text
    assert "In short: 1 yes" in text
    from flatlib.claims import DESIGN_CHANGES, RULE_CHANGES
    # every change is printed
    assert all(f"| {change[0]} |" in text for change in RULE_CHANGES + DESIGN_CHANGES)
    assert write_report("smoke").read_text() == text


def test_a_truncated_claims_file_is_named_and_the_rest_is_reported(figures):
    """It used to crash the report with a bare JSONDecodeError naming no file."""
    from flatlib.tools.report import DamagedFileError, damaged_files

    record_claims("smoke", "03_model_size", [claim()])
    path = figures / "smoke" / "claims" / "02_pretraining_to_optimality.json"
    path.write_text((figures / "smoke" / "claims" / "03_model_size.json").read_text()[:50])
    text = render_report("smoke")
    assert "## Damaged files" in text and "`claims/02_pretraining_to_optimality.json`" in text
    assert "not valid JSON" in text and "### 03_model_size" in text and "In short: 1 yes" in text
    with pytest.raises(DamagedFileError, match=str(path)):
        load_claims("smoke")
    assert [e.path for e in damaged_files("smoke")] == [str(path)]


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda c: c.pop("held"), r"claim 1 \('trace falls'\) has no 'held'"),
    (lambda c: c.update(held="maybe"), r"claim 1 \('trace falls'\): held: expected one of"),
    (lambda c: c.update(colour="red"), r"claim 1 \('trace falls'\): .*colour"),
])
def test_a_claim_that_is_not_a_claim_names_its_file_and_its_number(figures, edit, problem):
    import json

    from flatlib.tools.report import DamagedFileError

    path = record_claims("smoke", "03_model_size", [claim()])
    data = json.loads(path.read_text())
    edit(data["claims"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(DamagedFileError, match=f"{path}: {problem}"):
        load_claims("smoke")
    assert "`claims/03_model_size.json`" in render_report("smoke")


def test_a_damaged_runs_record_is_kept_aside_and_the_results_recorded_afresh(figures):
    import json

    from flatlib.tools.report import DamagedFileError

    result = {"notebook": "03_model_size.ipynb", "ok": True, "seconds": 60.0, "error": ""}
    path = record_runs("smoke", [result])
    path.write_text(path.read_text()[:30])
    with pytest.raises(DamagedFileError, match=f"{path}: not valid JSON.*kept as {path}.damaged"):
        record_runs("smoke", [{**result, "notebook": "01_synthetic_languages.ipynb"}])
    assert set(json.loads(path.read_text())) == {"01_synthetic_languages"}
    assert (figures / "smoke" / "claims" / "_runs.json.damaged").read_text().startswith("{")
    path.write_text(json.dumps({"01_synthetic_languages": {"ok": "yes", "seconds": 1.0}}))
    assert "the entry of '01_synthetic_languages'" in render_report("smoke")


def test_the_verdicts_that_moved_get_their_own_section(figures):
    record_claims("smoke", "03_model_size", [claim()])
    assert "Verdicts that moved" not in render_report("smoke")  # no comparison: no section
    none = render_report("smoke", moved=("commit abc1234", []))
    assert "## Verdicts that moved against the committed figures (commit abc1234)" in none and "None:" in none
    text = render_report("smoke",
                         moved=("commit abc1234", [("03_model_size", "trace | falls", "inconclusive", "yes"),
                                                   ("02_x", "new claim", "(absent)", "no")]))
    assert ("2 verdict(s) differ" in text
            and "| 03_model_size | trace \\| falls | inconclusive | **yes** |" in text)
    assert text.index("## Verdicts that moved") < text.index("## Decision rules")


def test_reproduce_report_only_rewrites_the_report_with_the_moved_verdicts(figures, monkeypatch, capsys):
    from flatlib.tools import reproduce

    record_claims("smoke", "03_model_size", [claim()])
    monkeypatch.setattr(reproduce, "moved_verdicts",
                        lambda profile: ("commit abc1234", [("n", "c", "no", "yes")]))
    assert reproduce.main(["--profile", "smoke", "--report-only"]) == 0
    text = (figures / "smoke" / "REPORT.md").read_text()
    assert "| n | c | no | **yes** |" in text and "claims report:" in capsys.readouterr().out


def test_the_probe_choices_at_the_grid_edge_are_counted_per_table(figures):
    import pandas as pd

    from flatlib.tools.report import l2_edge_lines

    grid = (1e-7, 1e-6, 1e-5, 10.0)
    folder = figures / "smoke"
    folder.mkdir()
    pd.DataFrame({"language": ["hmm", "hmm", "pcfg"], "acc A": [0.9, 0.8, 0.7], "l2 A": [1e-7, 1e-6, 1e-7],
                  "l2 B": [10.0, None, 1e-5]}).to_csv(folder / "02_m.csv", index=False)
    pd.DataFrame({"language": ["hmm"], "gap": [0.1]}).to_csv(folder / "05_no_choices.csv", index=False)
    lines = l2_edge_lines(folder, grid)
    row = next(line for line in lines if line.startswith("| 02_m.csv"))
    # 5 choices (one missing): 1e-7 twice at the lower edge (hmm A, pcfg A), 10 once at the upper (hmm B)
    assert row == "| 02_m.csv | 5 | 2 | 1 | lower: hmm A 1, pcfg A 1; upper: hmm B 1 |"
    assert not any("05_no_choices" in line for line in lines)
    (folder / "04_damaged.csv").write_bytes(b"\xff\xfe\x00bad")
    damaged = l2_edge_lines(folder, grid)
    assert any(line.startswith("| 04_damaged.csv | could not be read") for line in damaged)
    (folder / "04_damaged.csv").unlink()
    assert l2_edge_lines(folder, None) == []  # no protocol-2 grid: no section
    assert l2_edge_lines(folder, (1e-4,)) == []  # one fixed strength: nothing chosen
    # a table without a language column, and a cell that is not a number (not a choice)
    pd.DataFrame({"l2 A": [1e-7, "x", 1e-6]}).to_csv(folder / "03_plain.csv", index=False)
    plain = next(line for line in l2_edge_lines(folder, grid) if line.startswith("| 03_plain.csv"))
    assert plain == "| 03_plain.csv | 2 | 1 | 0 | lower: A 1 |"
    (folder / "03_plain.csv").unlink()
    # the report shows the section for a protocol-2 profile only, before the rules
    record_claims("smoke", "03_model_size", [claim()])
    protocol = {"probe_version": 2, "probe_l2_grid": grid}
    text = render_report("smoke", {"pretraining": {"protocol": protocol}})
    assert row in text
    assert text.index("## The probe's L2 at the grid's edge") < text.index("## Decision rules")
    assert "grid's edge" not in render_report("smoke", {"pretraining": {"protocol": {"probe_version": 1}}})
