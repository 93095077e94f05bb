"""Model shapes and counts (config), the LM and its mixers (lm, mixers), data, the training loop, evals."""
