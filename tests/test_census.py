"""flatlib.census counts what a profile's story trains and measures, before it runs."""

from flatlib.census import census, main
from flatlib.profiles import resolve


def test_the_smoke_story_counted_by_hand():
    training, measurements = census(resolve("smoke"))
    t = training.set_index("origin")
    # phase 1: 2 languages x 2 seeds x 60 steps; continuations 40 steps each
    assert (t.loc["02 phase 1", "runs"], t.loc["02 phase 1", "steps"]) == (4, 240)
    assert (t.loc["02 sgd", "runs"], t.loc["02 adamw", "steps"]) == (4, 160)
    # the clock: 2 noise seeds per lineage, one trajectory each to tau = 0.03 at lr 0.1, batch 8:
    # 0.03 * 8 / 0.01 = 24 steps; anneals: a control per lineage + 2 noise x 2 doses, 10 steps each
    assert (t.loc["02 sgd clock trajectory", "runs"], t.loc["02 sgd clock trajectory", "steps"]) == (8, 8 * 24)
    assert (t.loc["02 sgd clock", "runs"], t.loc["02 sgd clock", "steps"]) == (4 * 5, 4 * 5 * 10)
    assert t.loc["02 sgd clock trajectory", "sentences"] == 8 * 24 * 8
    # the adversary's weight: the held-out seed's phase 1 (60), AdamW (40) and one run per lambda (2 x 40)
    assert (t.loc["04 adversary weight (held-out seed)", "runs"],
            t.loc["04 adversary weight (held-out seed)", "steps"]) == (4, 180)
    assert (t.loc["04 adversarial", "runs"], t.loc["03 sizes", "runs"]) == (2, 4)
    assert (training["TFLOP"] > 0).all()
    m = measurements.set_index("kind")["measurements"]
    assert m["fine-tuning (03)"] == 4 and m["widened trace (03, 05)"] == 2  # the widest width is not widened


def test_the_command_prints_the_totals(capsys):
    assert main(["--profile", "smoke"]) == 0
    assert capsys.readouterr().out.startswith("profile smoke: 50 training runs, 1,452 steps")
