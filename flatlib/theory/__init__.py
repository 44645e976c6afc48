"""The theory of the paper, made computable: small, exact objects for notebook 06.

Everything here lives on a **finite set of contexts** ``c = 1..N`` (a ``ContextSet``): context ``c``
has probability ``w_c`` and an exact conditional ``p_c = p(. | c)`` over ``V`` words. A model maps
the context's input to logits ``z_c(theta)``, ``q_c = softmax(z_c)``, and the pre-training loss is the
expected single-mask cross-entropy

    L(theta) = sum_c w_c sum_y p_c(y) [-log q_c(y)],      L* = min L = sum_c w_c H(p_c)  (q = p).

One *example* is a pair ``(c, y)``: ``c ~ w``, ``y ~ p_c`` (the word is label noise from the true
conditional), with loss ``l(theta; c, y) = -log q_c(y)`` and gradient ``g = J_c^T (q_c - e_y)``,
``J_c = dz_c/dtheta``. Three matrices (``S(r) = diag r - r r^T``):

    H = sum_c w_c [J_c^T S(q_c) J_c + sum_k (q_c - p_c)_k d2 z_ck]                 (Hessian of L)
    C = Cov_(c,y)[g] = sum_c w_c J_c^T [S(p_c) + (q_c - p_c)(q_c - p_c)^T] J_c - grad L grad L^T
    F = sum_c w_c E_(y ~ q_c)[g g^T] = sum_c w_c J_c^T S(q_c) J_c                   (Fisher, model labels)

At any global minimiser ``q = p``: the residual terms vanish, ``grad L = 0`` and **C = H = F**
(noise equals curvature). Away from it the three differ.

Modules, in the order of notebook 06:

* the set-up: ``contexts`` (``ContextSet``, ``hmm_contexts``: every single-mask context of a tiny
  HMM, ``with_ids``), ``factored`` (``FactoredSoftmax``, ``z_c = a_c^T B``: a manifold of exact optima),
  ``functional`` (``FlatModel``: a model as a function of one flat vector ``theta``, in
  ``flatlib.measurement.flatness``'s parameter order; the losses; ``per_example_gradients``) and ``curvature``
  (dense and exact, for tiny models: ``exact_hessian``, ``hessian_traces`` of many points at once,
  ``exact_gradient_covariance``, ``exact_fisher``, ``fisher_trace_at_optimum``, ``trace_gradient``);
* section 1, ``noise``: ``gradient_noise`` (the sampled C, with standard errors) and
  ``noise_vs_curvature`` (the section, with its verdict);
* section 2: ``dynamics`` (``run_sgd``, ``run_gd``, ``retract``, and ``slow_flow``, the predicted limit
  of SGD along the optimal set Gamma (Li, Wang & Arora 2022; the paper's Theorem):

      d theta / d tau = -1/4 grad_Gamma Tr H(theta),        tau = eta^2 k / B

  ) and ``implicit_bias`` (``sgd_vs_flow``: the section, with its verdict);
* section 3, the paper's transfer argument in our construction: ``bag_of_words``
  (``BagOfWordsLanguage``), ``transformer`` (``OneLayerTransformer``, its ``feature_solution`` and
  ``random_solution``, ``balance_neurons``) and ``transfer`` (``min_norm_head_errors``, the minimum-norm
  linear head on frozen neurons with its exact downstream error; ``flat_vs_sharp``: the section, with
  its verdict);
* ``figures``: the notebook's three figures; ``text``: how its reports print numbers.

The sizes of each profile are the ``theory`` section of ``flatlib.profiles`` (``theory_params``).
Second derivatives: forward-over-reverse (``jvp`` of ``grad``) or classic double backward only, never
``torch.func.hessian`` / ``jacrev(jacrev)`` (wrong with affine LayerNorm on torch 2.13,
docs/lessons.md); the row-by-row reference is ``flatlib.measurement.flatness.dense_hessian``. All randomness
comes from explicit ``torch.Generator`` s; everything is float64.
"""

from flatlib.theory.bag_of_words import BagOfWordsLanguage
from flatlib.theory.contexts import DTYPE, ContextSet, hmm_contexts, with_ids
from flatlib.theory.curvature import (
                                      exact_fisher,
                                      exact_gradient_covariance,
                                      exact_hessian,
                                      fisher_trace_at_optimum,
                                      hessian_traces,
                                      trace_gradient,
)
from flatlib.theory.dynamics import Flow, Trajectory, retract, run_gd, run_sgd, slow_flow
from flatlib.theory.factored import FactoredSoftmax
from flatlib.theory.functional import FlatModel, expected_loss, expected_loss_fn, per_example_gradients
from flatlib.theory.implicit_bias import SgdVerdict, SgdVsFlow, sgd_vs_flow
from flatlib.theory.noise import (
                                      NoiseEstimate,
                                      NoiseVerdict,
                                      NoiseVsCurvature,
                                      gradient_noise,
                                      noise_vs_curvature,
)
from flatlib.theory.text import tiny
from flatlib.theory.transfer import (
                                      FlatVsSharp,
                                      HeadErrors,
                                      TransferVerdict,
                                      flat_vs_sharp,
                                      min_norm_head_errors,
)
from flatlib.theory.transformer import (
                                      OneLayerTransformer,
                                      balance_neurons,
                                      feature_solution,
                                      neuron_trace_parts,
                                      random_solution,
)

__all__ = [
    "DTYPE", "ContextSet", "hmm_contexts", "with_ids", "BagOfWordsLanguage", "FactoredSoftmax",
    "OneLayerTransformer", "feature_solution", "random_solution", "neuron_trace_parts", "balance_neurons",
    "FlatModel", "expected_loss_fn", "expected_loss", "per_example_gradients",
    "exact_hessian", "hessian_traces", "exact_gradient_covariance", "exact_fisher", "fisher_trace_at_optimum",
    "trace_gradient",
    "NoiseEstimate", "gradient_noise", "NoiseVsCurvature", "NoiseVerdict", "noise_vs_curvature",
    "Trajectory", "run_sgd", "run_gd", "retract", "Flow", "slow_flow", "SgdVsFlow", "SgdVerdict",
    "sgd_vs_flow",
    "HeadErrors", "min_norm_head_errors", "FlatVsSharp", "TransferVerdict", "flat_vs_sharp", "tiny",
]
