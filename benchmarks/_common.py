"""Helpers shared by the benchmark scripts: one definition each.

The scripts are run as ``python benchmarks/X.py`` (this folder is then on ``sys.path``) or loaded by
file path in tests; each script puts this folder on ``sys.path`` before ``from _common import ...``.
"""

from __future__ import annotations

import io
import json
import os
import platform
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_NOTE = "the 2 CPU cores were shared with other engineers' jobs during the run"
INT8_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def default_shared() -> Path:
    """``$EFQUANT_SHARED``, else ``../shared`` next to the repository."""
    return Path(os.environ.get("EFQUANT_SHARED", REPO.parent / "shared"))


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def machine(threads: int | None = None) -> dict[str, Any]:
    """What ran the benchmark, for reading timings later (call it at the end of a run).

    One superset for every script, so each result JSON keeps every key it had: ``cpus`` (deploy.json)
    is ``cpu_count`` and ``load_average_at_end`` (finetune.json, deploy_parity.json) is ``load_average``
    under their older names; ``threads`` only when given."""
    import torch

    cpu, isa = platform.processor() or "", []
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    flags = next((line.split() for line in lines if line.startswith("flags")), [])
    isa = [f for f in INT8_ISA if f in flags]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "int8_isa": isa, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": _version("onnxruntime"), "brevitas": _version("brevitas"),
        "quantized_engine": torch.backends.quantized.engine,
        "load_average": load, "load_average_at_end": load,
    }
    if threads is not None:
        info["threads"] = threads
    return info


def load_teacher(name: str, shared: Path):
    """The real teachers in ``<shared>/models``: InsightFace MobileFaceNet-y1 (MXNet) or OpenCV SFace (ONNX)."""
    from efquant_fx.errors import EfquantError

    if name == "mobilefacenet":
        from efquant_fx.models.mxnet_import import load_mxnet_model

        d = shared / "models" / "insightface_mobilefacenet_y1"
        return load_mxnet_model(d / "model-symbol.json", d / "model-0000.params").eval()
    if name == "sface":
        from efquant_fx.models.onnx_import import load_onnx_model

        return load_onnx_model(shared / "models" / "sface" / "face_recognition_sface_2021dec_int8bq.onnx").eval()
    raise EfquantError(f"unknown teacher {name!r} (mobilefacenet, sface)", field="--models")


def state_dict_bytes(model) -> int:
    """Bytes of ``torch.save(model.state_dict())``."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def write_json(path: Path, doc: dict[str, Any], default=str) -> None:
    """Write ``doc`` as indented JSON atomically (a ``.tmp`` sibling, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=default))
    os.replace(tmp, path)
