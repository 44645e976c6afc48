"""Orchestration: the run store, the training sweep and its worker pool, the notebooks'
experiment designs, the cost census and the progress display."""
