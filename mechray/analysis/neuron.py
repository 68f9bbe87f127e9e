"""neuron analysis (being written)."""
