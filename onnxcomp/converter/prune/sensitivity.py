"""--prune-macs's sensitivity scan: each group pruned alone on a copy of the model, the
relative output error measured in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.backends.ort import SessionConfig, create_session, run
from onnxcomp.converter.base import PassContext
from onnxcomp.converter.prune.channels import prepare_analysis
from onnxcomp.converter.prune.reconstruct import adjust_readers
from onnxcomp.converter.prune.samplers import ReaderStats
from onnxcomp.core.inputs import input_specs
from onnxcomp.data.batches import sample_batches


class SensitivityScan:
    """Prunes copies of the model and measures the relative output error
    ||y' - y||^2 / ||y||^2 in ONNX Runtime on the first samples of the calibration data.
    ``reconstruct`` and ``compensate`` say how the reading layers adjust (as in the pass)."""

    def __init__(
        self,
        model: ir.Model,
        context: PassContext,
        samples: int,
        reconstruct: bool,
        compensate: bool,
    ) -> None:
        self.proto = ir.to_proto(model)
        self.context = context
        self.reconstruct = reconstruct
        self.compensate = compensate
        batches, _, _ = sample_batches(input_specs(self.proto), context.calibration)  # type: ignore[arg-type]
        feeds: list[dict[str, np.ndarray]] = []
        rows = 0
        for batch, _labels in batches:
            feeds.append(batch)
            rows += len(next(iter(batch.values())))
            if rows >= samples:
                break
        self.feeds = feeds
        self.reference = self._run(self.proto)

    def _run(self, proto) -> list[np.ndarray]:
        session = create_session(proto, self.context.session or SessionConfig())
        outputs = [run(session, feeds) for feeds in self.feeds]
        return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]

    def error(self, classes: list[int], stats: dict[str, ReaderStats]) -> float:
        """The relative output error of the model with these classes removed."""
        copy = ir.from_proto(self.proto)
        analysis = prepare_analysis(copy)
        analysis.remove(
            classes,
            lambda removed: adjust_readers(
                analysis, removed, stats, self.reconstruct, self.compensate
            ),
        )
        got = self._run(ir.to_proto(copy))
        num = sum(float(np.sum(np.square(g - r))) for g, r in zip(got, self.reference, strict=True))
        den = sum(float(np.sum(np.square(r))) for r in self.reference)
        return num / max(den, 1e-30)
