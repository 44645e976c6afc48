"""What a checkpoint is measured for: the MLM batches, downstream probes, flatness estimators
(Hessian trace, exact Fisher diagonals), the symmetry gauge, the measurement protocol, and
the HuggingFace adapter."""
