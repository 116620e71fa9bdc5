"""onnxcomp.stats: one streamed run over the data, with observers."""
