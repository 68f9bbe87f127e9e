"""sae analysis (being written)."""
