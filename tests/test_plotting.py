"""flatlib.plots.style: figures saved under the profile's folder, stamped with profile and seed."""

import matplotlib.pyplot as plt
import pytest

from flatlib.plots.style import figures_dir, saver


def test_saver_fills_in_profile_and_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATLIB_FIGURES", str(tmp_path))
    save = saver("smoke", 7)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    try:
        assert save(fig, "06_test", "a note") is None  # a cell ending with save(...) shows no path
        footer = [t.get_text() for t in fig.texts]
        png = figures_dir("smoke") / "06_test.png"
    finally:
        plt.close(fig)
    assert png == tmp_path / "smoke" / "06_test.png"
    assert png.exists() and png.with_suffix(".pdf").exists()
    assert footer == ["profile=smoke · seed=7 · a note"]


def test_saver_refuses_a_bad_profile_at_once():
    with pytest.raises(ValueError, match="profile"):
        saver("../elsewhere", 0)
