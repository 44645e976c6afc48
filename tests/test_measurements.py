"""The checkpoint measurement's probes and traces (flatlib.runner.experiments.measure_checkpoint), and the
probe options they use (flatlib.measurement.downstream)."""

import math

import pytest
import torch
from test_experiments import LANGUAGE, SMALL, base_config

from flatlib.languages import build_language
from flatlib.measurement.downstream import linear_probe, model_features
from flatlib.measurement.measure import PROBES, Protocol, measure_checkpoint
from flatlib.runner.runs import RunStore
from flatlib.training.model import Transformer, TransformerConfig
from flatlib.training.train import PretrainConfig, load_model, pretrain


def test_masked_position_features_are_those_of_the_masked_sentence():
    language = build_language(LANGUAGE)
    corpus = language.sample(5, seed=0)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=8, max_len=8, n_layer=1, n_head=2, d_model=16,
                                          d_ff=32)).eval()
    masked = model_features(model, corpus, masked_position=3)
    tokens = corpus.tokens.clone()
    tokens[:, 3] = model.config.mask_id
    with torch.no_grad():
        assert torch.allclose(masked, model.features(tokens), atol=1e-6)
    assert not torch.allclose(masked, model_features(model, corpus), atol=1e-3)
    with pytest.raises(ValueError, match="masked_position"):
        model_features(model, corpus, masked_position=8)


def test_unstandardised_probe_sees_feature_scales_and_the_standard_one_does_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(600, generator=g, dtype=torch.float64) > 0).long()
    scaled = x * torch.tensor([1e-3, 1, 1, 1, 1, 1], dtype=torch.float64)  # shrink the informative feature
    kwargs = dict(n_classes=2, n_train=200, n_test=200, l2_grid=(1e-1,), n_splits=2)
    assert math.isclose(linear_probe(x, y, **kwargs).accuracy, linear_probe(scaled, y, **kwargs).accuracy,
                        abs_tol=1e-9)
    raw, raw_scaled = (linear_probe(x, y, **kwargs, standardize=False),
                       linear_probe(scaled, y, **kwargs, standardize=False))
    assert raw_scaled.accuracy < raw.accuracy - 0.1  # the L2 penalty now hits the shrunken feature


def test_measure_checkpoint_reports_every_probe_and_both_traces(tmp_path):
    run = pretrain(base_config(), RunStore(tmp_path), progress=False)
    m = measure_checkpoint(run, 40, SMALL)
    assert set(m["extra_probes"]) == {"all positions", "limited", "masked"} == set(SMALL.extra_probes)
    for kind, tasks in m["extra_probes"].items():
        assert set(tasks) == {"state@3"} and 0 < tasks["state@3"]["accuracy"] <= 1, kind
    assert m["extra_probes"]["limited"]["state@3"]["chosen_l2"] == [SMALL.limited_l2] * SMALL.probe_splits
    assert m["invariant_trace"] <= m["trace_body"] + sum(g["norm"] + g["reader"]
                                                         for g in m["trace_gauge"].values())
    assert m["invariant_trace_se"] > 0 and "LayerNorm gauge" in m["invariant_trace_description"]
    assert set(m["trace_gauge"]) == {"blocks.0.ln_1", "blocks.0.ln_2", "ln_f"}
    assert math.isfinite(m["trace"]) and m["trace_se"] > 0


def test_protocol_names_unknown_probes():
    assert "standard" in PROBES
    with pytest.raises(ValueError, match="extra_probes: unknown"):
        Protocol(extra_probes=("lookup",))


def test_measure_gauge_one_function_three_raw_traces_one_invariant(tmp_path):
    from flatlib.measurement.measure import measure_gauge

    run = pretrain(base_config(), RunStore(tmp_path), progress=False)
    g = measure_gauge(run, 40, SMALL)
    points = {p["parameterization"]: p for p in g["points"]}
    assert len(points) == 3
    trained, folded, tripled = points.values()
    for p in (folded, tripled):
        assert p["max logit change"] < 1e-4  # the same function
        assert math.isclose(p["invariant_trace"], trained["invariant_trace"], rel_tol=1e-4)
    assert tripled["trace"] > folded["trace"] + 4 * math.hypot(tripled["trace_se"], folded["trace_se"])
    assert set(g["blocks"]) == {"head weights", "head bias", "ln_f", "everything else"}
    assert measure_gauge(run, 40, SMALL) == g  # cached


@pytest.mark.parametrize("field, value",
                         [("seed", None), ("seed", -1), ("trace_probes", 1), ("probe_train", 0)])
def test_protocol_names_a_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        Protocol(**{field: value})


def test_full_gauge_protocol_decides_on_the_full_gauge_and_records_the_layernorm_minimum(tmp_path):
    from dataclasses import replace

    from flatlib.measurement.measure import _trace_batches
    from flatlib.measurement.mlm import mlm_logits_fn, mlm_loss_fn
    from flatlib.measurement.symmetry import full_gauge_trace
    from flatlib.seeds import derived_seed
    from flatlib.training.objective import validation_set

    full = replace(SMALL, gauge="full")
    assert full.key() != SMALL.key() and replace(SMALL, gauge="layernorm").key() == SMALL.key()
    run = pretrain(base_config(), RunStore(tmp_path), progress=False)
    m = measure_checkpoint(run, 40, full)
    model = load_model(run, 40)
    val = validation_set(base_config(), build_language(LANGUAGE))
    reference = full_gauge_trace(model, mlm_loss_fn, mlm_logits_fn, _trace_batches(model, val, full),
                                 full.trace_probes, derived_seed("trace probes", full.seed))
    assert m["gauge"] == "full" and m["invariant_trace"] == reference.mean
    assert (m["invariant_trace_layernorm"] == reference.norm_mean
            and m["trace_gauged_raw"] == reference.raw_mean)
    # the full minimum is over more rescalings than the LayerNorm-only one, which is over more than none
    assert m["invariant_trace"] <= m["invariant_trace_layernorm"] <= m["trace_gauged_raw"]
    assert m["gauge_max_logit_change"] < 1e-3 and "whole declared gauge" in m["invariant_trace_description"]
    # the probes do not depend on the gauge: the same numbers as under the LayerNorm protocol
    assert m["probes"] == measure_checkpoint(run, 40, SMALL)["probes"]


def test_measure_gauge_full_is_one_number_along_attention_rescalings_where_the_layernorm_one_moves(tmp_path):
    from dataclasses import replace

    from flatlib.measurement.measure import measure_gauge

    run = pretrain(base_config(), RunStore(tmp_path), progress=False)
    g = measure_gauge(run, 40, replace(SMALL, gauge="full"))
    points = {p["parameterization"]: p for p in g["points"]}
    assert list(points)[3:] == ["attention V/O x3 per head coordinate",
                                "attention Q/K x3 per head coordinate"]
    trained = points["as trained"]
    for name, p in points.items():
        assert p["max logit change"] < 1e-4, name  # one function
        assert math.isclose(p["invariant_trace"], trained["invariant_trace"], rel_tol=1e-4), name
    vo = points["attention V/O x3 per head coordinate"]
    assert abs(vo["invariant_trace_layernorm"] / trained["invariant_trace_layernorm"] - 1) > 1e-3


@pytest.mark.parametrize("value", ["LayerNorm", "", None, 1])
def test_protocol_refuses_an_unknown_gauge(value):
    with pytest.raises(ValueError, match="gauge: expected one of"):
        Protocol(gauge=value)


def test_a_measurement_row_has_the_probe_chosen_l2_with_protocol_2_only():
    from flatlib.measurement.measure import measurement_row

    version1 = {"gap": 0.1, "probes": {"A": {"accuracy": 0.9, "ci95": 0.01, "chosen_l2": [1e-4, 1e-3]}},
                "extra_probes": {"limited": {"A": {"accuracy": 0.8}}}}
    row = measurement_row(version1)
    assert row == {"gap": 0.1, "acc A": 0.9, "acc A ci95": 0.01, "acc A [limited]": 0.8}
    version2 = {**version1, "probes": {"A": {**version1["probes"]["A"], "l2": 3e-5, "l2_edge": None},
                                       "B": {"accuracy": 0.5, "ci95": 0.02, "l2": 1e-7, "l2_edge": "lower"}}}
    row = measurement_row(version2)
    assert row["l2 A"] == 3e-5 and row["l2 B"] == 1e-7 and row["acc B"] == 0.5
