"""Cross-layer equalization."""
