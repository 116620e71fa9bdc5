"""Channel pruning (L1, ThiNet) with the channel dependency analysis."""
