"""Notebook 06 (the theory): its parameters, its checks and its checked summary. The constructions,
the exact estimators and the three demonstrations' verdicts are the ``flatlib.theory`` package; this
module is the notebook's side of the contract every notebook's analysis module keeps (``parameters``,
``claims``, ``summary``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from flatlib.claims import Claim
from flatlib.profiles import theory_params


class Verdict(Protocol):
    """What the three demonstrations' verdicts share (``NoiseVerdict``, ``SgdVerdict``,
    ``TransferVerdict``)."""

    def failed_checks(self) -> list[str]: ...

    def summary(self) -> str: ...

    def claim(self) -> Claim: ...


def parameters(profile: str, seed: int = 0, n_chains: int | None = None) -> dict[str, Any]:
    """Notebook 06's parameters: the profile's ``theory`` section (``flatlib.profiles.theory_params``)
    with ``n_chains`` (None: the profile's) for the implicit-bias demonstration. Invalid values raise
    ``ValueError`` naming the parameter."""
    return theory_params(profile, seed=seed, implicit_bias={"n_chains": n_chains})


def claims(verdicts: Sequence[Verdict]) -> list[Claim]:
    """One claim per demonstration, in the order of ``verdicts``, for the report."""
    return [v.claim() for v in verdicts]


def failed_checks(verdicts: Sequence[Verdict]) -> list[str]:
    """Every demonstration's broken checks (exact optima, exact identities, finite estimates...), each
    as a message; empty when all hold."""
    return [message for v in verdicts for message in v.failed_checks()]


def summary(params: dict[str, Any], verdicts: Sequence[Verdict]) -> str:
    """Notebook 06's rounded summary: a header line, one line per verdict, and what the checks cover.
    Raises ``AssertionError`` listing the broken checks if any (``failed_checks``)."""
    problems = failed_checks(verdicts)
    assert not problems, problems
    lines = ([f"06_theory · profile={params['profile']} · seed={params['seed']}"]
             + [v.summary() for v in verdicts])
    if params["profile"] == "smoke":
        lines.append("profile smoke: short runs and few draws; the numbers check the code path")
    lines.append("checks passed: exact optima · exact identities at the optimum · finite estimates · GD and "
                 "the flow stay optimal")
    return "\n".join(lines)
