"""Small table builders the notebooks share: parameters, final gaps, gauge and reference tables."""

import pytest

from flatlib.analysis.pretraining import gauge_tables, reference_table
from flatlib.tools.report import parameter_lines


def test_parameter_lines_expand_the_named_sections():
    text = parameter_lines({"profile": "cpu", "seed": 0, "clock": {"lr": 0.1, "taus": [0, 1]}}, ("clock",))
    lines = text.splitlines()
    assert [line.split(": ")[0].strip() for line in lines] == ["profile", "seed", "clock.lr", "clock.taus"]
    assert len({line.index(":") for line in lines}) == 1  # aligned
    assert lines[-1].endswith(": [0, 1]")


def test_gauge_and_reference_tables():
    gauge = {"hmm": {"points": [{"parameterization": "as trained", "trace": 20.0},
                                {"parameterization": "x3", "trace": 300.0}],
                     "blocks": {"head weights": {"trace": 15.0, "trace_se": 1.0}}}}
    points, blocks = gauge_tables(gauge)
    assert list(points.trace) == [20.0, 300.0] and list(points.language) == ["hmm", "hmm"]
    assert blocks.set_index("block").loc["head weights", "trace"] == 15.0
    lookup = {"hmm": {"state@3": {"accuracy": 0.5, "ci95": 0.01, "majority": 0.3, "bayes": 0.6,
                                  "bayes_se": 0.02}},
              "pcfg": {"A": {"accuracy": 0.9, "ci95": 0.02, "majority": 0.4}}}
    refs = reference_table(lookup)
    assert refs.loc[("hmm", "state@3"), "Bayes"] == 0.6 and refs.loc[("hmm", "state@3"), "Bayes se"] == 0.02
    # a function of the sentence
    assert refs.loc[("pcfg", "A"), "Bayes"] == 1.0 and refs.loc[("pcfg", "A"), "Bayes se"] == 0.0




def test_final_gaps_reads_each_runs_summary():
    from flatlib.runner.experiments import final_gaps

    class Finished:  # what final_gaps reads of a run
        def __init__(self, gap):
            self.gap = gap

        def summary(self):
            return {"steps": 100, "n_params": 5000, "val_optimum": 1.5, "final_val_loss": 1.5 + self.gap,
                    "final_gap": self.gap, "final_gap_se": 0.001}

    table = final_gaps({("hmm", 0): Finished(0.01), ("hmm", 1): Finished(0.03)}, epsilon=0.025)
    assert list(table.index) == [("hmm", 0), ("hmm", 1)]
    assert list(table["within ε=0.025"]) == [True, False]
    assert table.loc[("hmm", 1), "val loss"] == pytest.approx(1.53)
