"""The notebooks' figures, one module per notebook topic. Each function draws one figure from the
tables the analysis modules return (``flatlib.training.clock``, ``flatlib.analysis.size``, ...) and returns
it; the notebook shows it and saves it with ``flatlib.plots.style.saver``. Nothing here computes a number that
a claim depends on."""
