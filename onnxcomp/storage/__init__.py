"""Storage forms of compressed models (what users ship), read back to runnable ONNX."""

from onnxcomp.storage.packed import FORMAT_VERSION, PackResult, pack, read_header, unpack

__all__ = ["FORMAT_VERSION", "PackResult", "pack", "read_header", "unpack"]
