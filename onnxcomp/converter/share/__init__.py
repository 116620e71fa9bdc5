"""k-means weight sharing (``--weight-sharing K``): one codebook of K values per layer."""

from onnxcomp.converter.share.config import SHARED_MARK, ShareConfig
from onnxcomp.converter.share.kmeans import kmeans_1d, linear_init
from onnxcomp.converter.share.share_pass import SharePass, share_weight

__all__ = ["SHARED_MARK", "ShareConfig", "SharePass", "kmeans_1d", "linear_init", "share_weight"]
