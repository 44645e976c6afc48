import math

import pytest

from flatlib.checks import check_number
from flatlib.languages import HMM, PCFG
from flatlib.profiles import PROFILES, build_languages, resolve, theory_params


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_resolves(name):
    params = resolve(name)
    assert params["profile"] == name and params["seed"] == 0


def test_profile_languages():
    languages = build_languages(resolve("smoke"))
    assert isinstance(languages["hmm"], HMM) and isinstance(languages["pcfg"], PCFG)
    paper = resolve("paper")
    assert paper["hmm"]["n_states"] == 100 and paper["hmm"]["vocab_size"] == 200
    assert PCFG.random(seed=0, **{k: v for k, v in paper["pcfg"].items()}).max_len == 32


def test_overrides_apply_and_none_keeps_the_profile():
    params = resolve("smoke", seed=3, n_eval_sentences=None, hmm={"seq_len": 10})
    assert params["seed"] == 3
    assert params["n_eval_sentences"] == PROFILES["smoke"]["n_eval_sentences"]
    assert (params["hmm"]["seq_len"] == 10
            and params["hmm"]["n_states"] == PROFILES["smoke"]["hmm"]["n_states"])


@pytest.mark.parametrize(
    "profile, overrides, match",
    [
        ("gpu-xl", {}, "profile: unknown profile 'gpu-xl'"),
        ("smoke", {"seed": -1}, "seed: expected an integer"),
        ("smoke", {"seed": 1.5}, "seed: expected an integer"),
        ("smoke", {"n_eval_sentences": 1}, "n_eval_sentences"),
        ("smoke", {"n_eval_sentences": True}, "n_eval_sentences"),
        ("smoke", {"learning_rate": 1e-3}, "learning_rate: unknown parameter"),
        ("smoke", {"hmm": {"n_states": 0}}, "hmm.n_states"),
        ("smoke", {"hmm": {"concentration": -1.0}}, "hmm.concentration"),
        ("smoke", {"pcfg": {"depth": 0}}, "pcfg.depth"),
        ("smoke", {"pcfg": {"colour": "red"}}, "pcfg.*colour"),
        ("smoke", {"teacher": {"temperature": 0.0}}, "teacher.temperature"),
        ("smoke", {"teacher": {"n_topics": 0}}, "teacher.n_topics"),
    ],
)
def test_invalid_parameters_name_the_parameter(profile, overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve(profile, **overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"pretraining": {"seeds": 1}}, "pretraining.seeds"),
        ({"pretraining": {"steps": {"hmm": 0, "pcfg": 10}}}, "pretraining.steps.hmm"),
        ({"pretraining": {"steps": {"hmm": 100}}}, "pretraining.steps"),
        ({"pretraining": {"sgd_lr": -0.1}}, "pretraining.sgd_lr"),
        ({"pretraining": {"lr_scan": ()}}, "pretraining.lr_scan"),
        ({"pretraining": {"checkpoint_every": 7}}, "pretraining.checkpoint_every"),
        ({"pretraining": {"model": {"n_layer": 1}}}, "pretraining.model"),
        ({"pretraining": {"protocol": {"probe_train": 0}}}, "pretraining.protocol.probe_train"),
        ({"pretraining": {"protocol": {"colour": 1}}}, "pretraining.protocol"),
        ({"pretraining": {"workers": 0}}, "pretraining.workers"),
        ({"pretraining": {"schedule": "cosine"}}, "pretraining: unknown keys"),
    ],
)
def test_invalid_pretraining_parameters_name_the_parameter(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve("smoke", **overrides)


def test_pretraining_overrides_merge_into_the_section():
    params = resolve("smoke", pretraining={"seeds": 3})
    assert params["pretraining"]["seeds"] == 3
    assert params["pretraining"]["lr"] == PROFILES["smoke"]["pretraining"]["lr"]


def test_every_profile_has_theory_sizes():
    """Notebook 06 takes the same profiles as the others: their "theory" section, validated by resolve too."""
    for name in PROFILES:
        assert theory_params(name)["profile"] == name
        assert resolve(name)["theory"] == PROFILES[name]["theory"]
    assert PROFILES["gpu"]["theory"] == PROFILES["paper"]["theory"]


@pytest.mark.parametrize(
    "theory, match",
    [
        ({"rank": 2}, "theory.rank"),
        ({"noise": {"n_samples": 1, "n_forms": 4, "offset": 0.5}}, "theory.noise.n_samples"),
        ({"hmm": {"n_states": 0, "vocab_size": 3, "seq_len": 3, "concentration": 0.5}},
         "theory.hmm.n_states"),
        ({"colour": 1}, r"theory: unknown keys \['colour'\]"),
    ],
)
def test_resolve_checks_the_theory_section(theory, match):
    with pytest.raises(ValueError, match=match):
        resolve("smoke", theory={**PROFILES["smoke"]["theory"], **theory})


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "1", None])
def test_check_number_refuses_what_is_not_a_positive_number(value):
    with pytest.raises(ValueError, match=r"^lr: expected a positive number, got"):
        check_number("lr", value)


def test_check_number_with_bounds():
    check_number("p", 0.5, low=0.0, high=1.0)
    check_number("lr", 3)  # an int is a number
    with pytest.raises(ValueError, match=r"p: expected a number in \(0.0, 1.0\), got 1.0"):
        check_number("p", 1.0, low=0.0, high=1.0)


def test_the_gpu_profile_shares_the_cpu_languages():
    """The gpu report is comparable with the cpu one: the same languages, more of everything else."""
    cpu, gpu = resolve("cpu"), resolve("gpu")
    assert all(gpu[name] == cpu[name] for name in ("hmm", "pcfg", "teacher", "language_seed"))
    assert gpu["pretraining"]["seeds"] >= 5  # notebook 05 decides a correlation from 5 lineages on


@pytest.mark.parametrize("override, match", [
    ({"weight_grid": {"hmm": [0.1, 0.03], "pcfg": [0.1]}}, "algorithms.weight_grid.hmm: expected increasing"),
    ({"weight_grid": {"hmm": [], "pcfg": [0.1]}}, "algorithms.weight_grid.hmm: expected a list"),
    ({"weight_grid": {"hmm": [0.0, 0.1], "pcfg": [0.1]}}, "algorithms.weight_grid.hmm"),
    ({"weight_grid": {"hmm": [0.1]}}, "algorithms.weight_grid: expected an entry for each"),
    ({"held_out_seed": 1}, "algorithms.held_out_seed"),  # seed + 1 is an evaluated seed (3 seeds at cpu)
    ({"weights": {"hmm": -1.0, "pcfg": 0.1}}, "algorithms.weights.hmm"),
])
def test_the_adversary_weight_settings_are_checked(override, match):
    with pytest.raises(ValueError, match=match):
        resolve("cpu", algorithms=override)
