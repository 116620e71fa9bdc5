"""Channel pruning (``--prune R`` or ``--prune-macs F``)."""

from onnxcomp.converter.prune.config import PruneConfig
from onnxcomp.converter.prune.prune_pass import PrunePass

__all__ = ["PruneConfig", "PrunePass"]
