"""One figure style, and ``savefig``: PNG + PDF under figures/, stamped with how the figure was made;
``saver`` binds it to a notebook's profile and seed."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg; in Jupyter: inline
import seaborn as sns

REPO_ROOT = Path(__file__).resolve().parents[2]


def set_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight"})


def figures_dir(profile: str) -> Path:
    """figures/ for the default ``cpu`` profile, figures/<profile>/ for the others (so a smoke run
    never overwrites the committed figures). ``FLATLIB_FIGURES`` overrides the root folder."""
    # a profile names a folder: '../x' or 'a/b' would write outside figures/
    if not isinstance(profile, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", profile):
        raise ValueError(f"profile: expected a name of letters, digits, '_' or '-', got {profile!r}")
    root = Path(os.environ.get("FLATLIB_FIGURES", REPO_ROOT / "figures"))
    return root if profile == "cpu" else root / profile


def savefig(fig: plt.Figure, name: str, *, profile: str, seed: int, note: str) -> Path:
    """Save ``fig`` as ``name``.png and ``name``.pdf with a footer naming the profile, the seed and
    ``note`` (what the error bars are, how many samples...). Returns the PNG path."""
    if not name or "/" in name:
        raise ValueError(f"name: expected a plain file name, got {name!r}")
    # the footer goes below everything already drawn (tick labels can reach below the axes)
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    fig.text(box.x0 / fig.get_figwidth(), box.y0 / fig.get_figheight() - 0.01,
             f"profile={profile} · seed={seed} · {note}", fontsize=8, color="0.35", ha="left", va="top")
    folder = figures_dir(profile)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{name}.png"
    fig.savefig(png, metadata={"Software": None})
    fig.savefig(folder / f"{name}.pdf", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return png


def saver(profile: str, seed: int) -> Callable[[plt.Figure, str, str], None]:
    """A notebook's ``save(fig, name, note)``: ``savefig`` with the notebook's ``profile`` and ``seed``
    filled in, then ``plt.show()``. It returns nothing, so a cell ending with it displays only the
    figure (``savefig`` returns the PNG path where one is needed)."""
    figures_dir(profile)  # a bad profile name fails here, not at the first figure

    def save(fig: plt.Figure, name: str, note: str) -> None:
        savefig(fig, name, profile=profile, seed=seed, note=note)
        plt.show()

    return save
