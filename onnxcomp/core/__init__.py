"""onnxcomp.core: graph I/O and helpers every technique shares."""
