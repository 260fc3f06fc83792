"""Accuracy grids of every method on real data: an encoder (MiniLM-L6) and a decoder (SmolLM2-135M)."""
