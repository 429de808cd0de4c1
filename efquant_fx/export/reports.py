"""What each exporter returns: small dataclasses that say what was written and how far to trust it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class OnnxReport:
    """One exported ONNX file and its parity with PyTorch on the same inputs.

    ``cosine`` holds, per onnxruntime optimization level, the mean embedding cosine against the
    PyTorch model that was exported; ``cosine_vs_compressed`` the same against the compressed model
    as ``compress()`` returned it (differs when export added requantization points for int8
    kernels). onnxruntime's fused integer kernels round differently from Brevitas's simulation,
    so this is reported, never hidden.
    """

    path: str
    bytes: int
    kind: str  # "qcdq" or "float"
    opset: int
    input_name: str
    input_shape: list[str | int]
    outputs: list[str]
    images: int = 0
    cosine: dict[str, float] = field(default_factory=dict)
    cosine_min: dict[str, float] = field(default_factory=dict)
    cosine_vs_compressed: dict[str, float] = field(default_factory=dict)
    cosine_between_levels: float | None = None
    op_counts: dict[str, int] = field(default_factory=dict)
    runtime_op_counts: dict[str, int] = field(default_factory=dict)
    float_compute: dict[str, int] = field(default_factory=dict)
    added_output_points: int = 0
    export_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def any_float_compute(self) -> bool:
        """True when onnxruntime runs some Conv/Gemm/MatMul in float after its QDQ fusions."""
        return bool(self.float_compute)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "any_float_compute": self.any_float_compute}


@dataclass
class PackedReport:
    """A packed sub-8-bit weight file and how it compares with the fp32 state dict."""

    path: str
    bytes: int
    fp32_bytes: int
    layers: int
    bits: dict[str, int] = field(default_factory=dict)  # bit width -> number of layers
    packed_weight_bytes: int = 0
    float_tensor_bytes: int = 0
    max_abs_diff: float | None = None

    @property
    def size_ratio(self) -> float:
        return self.bytes / max(self.fp32_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.size_ratio}


@dataclass
class TorchInt8Report:
    """A torch.ao-lowered int8 model (TorchScript file) and its parity with float and fake-quant."""

    path: str
    bytes: int
    engine: str
    images: int = 0
    cosine_vs_float: float | None = None
    cosine_vs_compressed: float | None = None
    quantized_modules: int = 0
    float_modules: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
