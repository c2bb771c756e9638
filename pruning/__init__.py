"""Unstructured and N:M sparsification of decoder-layer weights with per-layer budgets (Wanda, magnitude, OWL)."""
