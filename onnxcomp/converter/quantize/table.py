"""Calibration tables (``--calib-cache``): activation ranges saved and reused, like TensorRT's.

A second convert with the same table skips the pass over the data. A table that lacks tensors
the model needs is refused, naming them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from onnxcomp.converter.quantize.calibrators import TensorRange
from onnxcomp.errors import OnnxcompError

FORMAT = "onnxcomp-calibration-table"
VERSION = 1


@dataclass
class CalibrationTable:
    """Per-tensor ranges and how they were obtained."""

    method: str
    ranges: dict[str, TensorRange]
    samples: int = 0
    settings: dict[str, object] = field(default_factory=dict)

    def missing(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if n not in self.ranges]

    def require(self, names: Iterable[str], source: str) -> None:
        missing = self.missing(names)
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise OnnxcompError(
                f"{source}: calibration table does not match the model: no range for {shown}; "
                "delete it (or give another --calib-cache path) to calibrate again"
            )

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "samples": self.samples,
            "settings": self.settings,
            "tensors": {name: r.to_list() for name, r in sorted(self.ranges.items())},
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.resolve().parent, prefix=".calib-", suffix=".json", delete=False
        ) as handle:
            json.dump(self.to_dict(), handle, indent=1)
        os.replace(handle.name, path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise OnnxcompError(f"{path}: not a readable calibration table: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise OnnxcompError(f"{path}: not an onnxcomp calibration table (no '{FORMAT}')")
        try:
            ranges = {
                n: TensorRange(float(lo), float(hi)) for n, (lo, hi) in data["tensors"].items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise OnnxcompError(f"{path}: malformed tensor ranges: {exc}") from exc
        return cls(
            method=str(data.get("method", "?")),
            ranges=ranges,
            samples=int(data.get("samples", 0)),
            settings=dict(data.get("settings", {})),
        )
