"""Training progress hooks for tests."""

from __future__ import annotations


class StopAfterEpoch:
    """Progress hooks raising KeyboardInterrupt after an epoch: a simulated Ctrl-C."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def start_epoch(self, epoch, epochs, steps):
        pass

    def step(self, samples, loss, accuracy):
        pass

    def end_epoch(self, stats):
        if stats.epoch == self.epoch:
            raise KeyboardInterrupt
