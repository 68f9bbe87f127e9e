"""feature analysis (being written)."""
