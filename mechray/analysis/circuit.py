"""circuit analysis (being written)."""
