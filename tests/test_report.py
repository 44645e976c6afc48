"""The claims report: claims recorded by notebooks, notebook runs merged, REPORT.md rendered."""

import pytest

from flatlib.report import Claim, load_claims, record_claims, record_runs, render_report, write_report


@pytest.fixture()
def figures(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATLIB_FIGURES", str(tmp_path))
    return tmp_path


def claim(**kw):
    return Claim(**{"claim": "trace falls", "paper": "19.8 -> 12.6", "ours": "30 ± 2 -> 25 ± 2", "held": "yes",
                    "notebook": "03_model_size", "figure": "03_size.png", **kw})


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
    assert all(f"| {change[0]} |" in text for change in RULE_CHANGES + DESIGN_CHANGES)  # every change is printed
    assert write_report("smoke").read_text() == text
