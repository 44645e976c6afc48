"""The factored lookup model of notebook 06, sections 1 and 2: a manifold of exact optima."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flatlib.checks import check_int
from flatlib.theory.contexts import DTYPE, ContextSet


class FactoredSoftmax(nn.Module):
    """A lookup model with a factored table: ``z_c = a_c^T B``, ``A in R^{N x r}``, ``B in R^{r x V}``.

    With ``r >= V`` and ``B`` of rank ``V`` it fits any conditionals exactly, in many ways: the
    optimal set ``Gamma = {(A, B): A B = log P + row constants}`` is a manifold of dimension
    ``P - N (V - 1)`` (the symmetry ``(A G, G^-1 B)`` and the null space of ``B``). At the optimum

        Tr H = sum_c w_c [ tr(B S_c B^T) + |a_c|^2 tr S_c ],      S_c = diag p_c - p_c p_c^T,

    which varies along Gamma: the flat points balance ``A`` against ``B``.
    """

    def __init__(self, n_contexts: int, rank: int, vocab_size: int) -> None:
        super().__init__()
        for name, value in (("n_contexts", n_contexts), ("rank", rank), ("vocab_size", vocab_size)):
            check_int(name, value)
        self.A = nn.Parameter(torch.zeros(n_contexts, rank, dtype=DTYPE))
        self.B = nn.Parameter(torch.zeros(rank, vocab_size, dtype=DTYPE))

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.A.index_select(0, ids.reshape(-1)).view(*ids.shape, self.A.shape[1])
        return rows @ self.B

    @classmethod
    def at_optimum(cls, contexts: ContextSet, rank: int, scale: float = 1.0,
                   seed: int = 0) -> "FactoredSoftmax":
        """An exact optimum: ``B`` Gaussian (entries ``N(0, scale^2)``, from ``seed``), ``A = Z B^+``
        with ``Z`` the centred log-conditionals. Large ``scale`` puts it at a sharp point of Gamma
        (large ``B``, small ``A``)."""
        V = contexts.vocab_size
        if rank < V:
            raise ValueError(f"rank: must be >= vocab_size ({V}) to fit the conditionals exactly")
        if (contexts.targets <= 0).any():
            raise ValueError("contexts: a conditional with a zero probability has no finite exact fit")
        model = cls(contexts.n_contexts, rank, V)
        g = torch.Generator().manual_seed(seed)
        B = scale * torch.randn(rank, V, generator=g, dtype=DTYPE)
        Z = contexts.targets.log()
        Z = Z - Z.mean(1, keepdim=True)
        with torch.no_grad():
            model.B.copy_(B)
            model.A.copy_(Z @ torch.linalg.pinv(B))
        return model

