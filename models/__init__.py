"""Model configs and arithmetic, the five architectures, data, training loop and evals."""
