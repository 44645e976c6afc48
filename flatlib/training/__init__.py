"""The model and how it trains: the training configuration, the transformer, the MLM objective
(with the adversarial term), the training loop, and the theory's clock for SGD."""
