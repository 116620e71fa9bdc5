"""What a target writer is given and what it hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Platform = Literal["arm", "amd64"]
IoDtype = Literal["float32", "int8", "uint8"]
PLATFORMS: tuple[str, ...] = ("arm", "amd64")
IO_DTYPES: tuple[str, ...] = ("float32", "int8", "uint8")


@dataclass(frozen=True)
class WriteOptions:
    """How to write the artifact: its base name (``resnet20`` -> ``resnet20.ort``), the device's
    CPU (``arm`` for phones, ``amd64`` for x86) and the input/output dtype of the file."""

    name: str
    platform: Platform = "arm"
    io_dtype: IoDtype = "float32"


@dataclass
class Artifact:
    """A written artifact: the file the device loads, the other files shipped beside it, what
    ops the runtime needs (``{"ai.onnx;13": ["Conv", ...]}`` when known) and notes for the
    report (what the target did with dynamic shapes, layouts...)."""

    path: Path
    extra_files: list[Path] = field(default_factory=list)
    runtime_ops: dict[str, list[str]] | None = None
    notes: list[str] = field(default_factory=list)
