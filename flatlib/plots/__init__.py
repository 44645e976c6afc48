"""The notebooks' figures, one module per notebook topic. Each function draws one figure from the
tables the analysis modules return (``flatlib.clock``, ``flatlib.size``, ...) and returns it; the
notebook shows it and saves it with ``flatlib.plotting.saver``. Nothing here computes a number that
a claim depends on."""
