"""dynamics analysis (being written)."""
