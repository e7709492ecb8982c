"""Measured quantities of a steered model, one module each (tokens, logodds, limits, xent, ...)."""
