"""One module per notebook: its parameters, what it trains and measures, its claims and its
checked summary (01 languages, 02 pretraining, 03 size, 04 algorithms, 05 correlations,
07 your_model; notebook 06's analysis is the flatlib.theory package)."""
