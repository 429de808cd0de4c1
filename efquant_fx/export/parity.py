"""Running an exported ONNX file in onnxruntime and comparing it with PyTorch on the same inputs.

Two optimization levels are checked: ``ORT_DISABLE_ALL`` executes the graph as written (float
convs on dequantized weights), ``ORT_ENABLE_ALL`` fuses Q/DQ into integer kernels that round
differently. Both numbers are reported, because a deployment sees the second one.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

LEVELS = {"enable_all": "ORT_ENABLE_ALL", "disable_all": "ORT_DISABLE_ALL"}
FLOAT_COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose")


def session(path: str | Path, level: str = "enable_all", threads: int = 0,
            optimized_path: str | Path | None = None):
    """A CPU onnxruntime session at one optimization level (warnings silenced)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS.get(level, level))
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, x: torch.Tensor | np.ndarray) -> np.ndarray:
    data = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.ascontiguousarray(data, dtype=np.float32)})[0]


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise cosine of two embedding batches."""
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def runtime_op_counts(path: str | Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs at ``ORT_ENABLE_ALL`` (after its fusions)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, "enable_all", threads=1, optimized_path=optimized)
        return op_counts(optimized)


def float_compute(counts: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in counts.items() if op in FLOAT_COMPUTE_OPS and n}


@torch.no_grad()
def parity(path: str | Path, inputs: torch.Tensor, reference: Callable[[torch.Tensor], torch.Tensor],
           second_reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
           threads: int = 0) -> dict[str, dict[str, float] | float]:
    """Cosine of onnxruntime's embeddings against ``reference`` (and ``second_reference``) per level."""
    ref = reference(inputs).float().cpu().numpy()
    ref2 = second_reference(inputs).float().cpu().numpy() if second_reference is not None else None
    outs: dict[str, np.ndarray] = {}
    mean, worst, vs2 = {}, {}, {}
    for level in LEVELS:
        outs[level] = run(session(path, level, threads), inputs)
        cos = cosine(outs[level], ref)
        mean[level], worst[level] = float(cos.mean()), float(cos.min())
        if ref2 is not None:
            vs2[level] = float(cosine(outs[level], ref2).mean())
    between = float(cosine(outs["enable_all"], outs["disable_all"]).mean())
    return {"cosine": mean, "cosine_min": worst, "cosine_vs_compressed": vs2, "between_levels": between}
