"""causal analysis (being written)."""
