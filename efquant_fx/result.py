"""What :func:`efquant_fx.compress` returns: the compressed graph plus everything needed to trust it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from efquant_fx.files import FileWriteError, atomic_torch_save, atomic_write_bytes
from efquant_fx.recipe import Recipe
from efquant_fx.rundir import RECIPE_FILE, REPORT_FILE, STATE_FILE

__all__ = ["CompressionResult", "FileWriteError", "atomic_torch_save", "atomic_write_bytes"]


@dataclass
class CompressionResult:
    model: nn.Module
    teacher: nn.Module
    recipe: Recipe
    layers: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, int] = field(default_factory=dict)
    size_bytes_before: int = 0
    size_bytes_after: int = 0
    calibration: list[dict[str, Any]] = field(default_factory=list)
    reconstruction: list[dict[str, Any]] = field(default_factory=list)  # learned rounding, per layer
    # teacher-student cosine: cosine_mean, cosine_min, images, held_out (False: scored on calibration images)
    fidelity: dict[str, Any] = field(default_factory=dict)
    ptq_fidelity: dict[str, Any] = field(default_factory=dict)  # before fine-tuning, when there was one
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        """One line: the generated repr printed both models and every report row (400,000+ characters)."""
        f = self.fidelity
        score = (f"cosine {f['cosine_mean']:.4f}" + ("" if f.get("held_out", True) else " (not held out)")
                 if "cosine_mean" in f else "not scored")
        return (f"CompressionResult(recipe={self.recipe.name!r}, {self.summary.get('quantized_layers', 0)}/"
                f"{self.summary.get('compute_layers', 0)} layers quantized, {self.size_bytes_before / 2**20:.2f} MiB"
                f" -> {self.size_bytes_after / 2**20:.2f} MiB, {score}, {len(self.notes)} note(s))")

    @property
    def size_ratio(self) -> float:
        return self.size_bytes_after / max(self.size_bytes_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "recipe_hash": self.recipe.hash,
            "summary": self.summary,
            "size_bytes_before": self.size_bytes_before,
            "size_bytes_after": self.size_bytes_after,
            "size_ratio": self.size_ratio,
            "fidelity": self.fidelity,
            "ptq_fidelity": self.ptq_fidelity,
            "timings_s": self.timings,
            "notes": self.notes,
            "layers": self.layers,
            "calibration": self.calibration,
            "reconstruction": self.reconstruction,
            "history": self.history,
        }

    def table(self, max_rows: int | None = 40):
        """A rich table of the per-layer plan (compute layers and quant points)."""
        from rich.table import Table

        t = Table(title=f"{self.recipe.name}: {self.summary.get('quantized_layers', 0)}/"
                        f"{self.summary.get('compute_layers', 0)} layers quantized, "
                        f"{self.size_bytes_before / 2**20:.2f} MiB -> {self.size_bytes_after / 2**20:.2f} MiB")
        for col in ("layer", "type", "params", "W bits", "A bits", "status", "why"):
            t.add_column(col)
        rows = [r for r in self.layers if r["type"] != "ActQuant"]
        shown = rows if max_rows is None else rows[:max_rows]
        for r in shown:
            t.add_row(r["layer"], r["type"], f"{r['params']:,}", str(r.get("weight_bits") or "-"),
                      str(r.get("act_bits") or "-"), r["status"], r.get("reason", ""))
        if len(shown) < len(rows):
            t.add_row(f"... {len(rows) - len(shown)} more", "", "", "", "", "", "")
        return t

    def save(self, out_dir: str | Path) -> Path:
        """Write ``recipe.yaml`` (resolved), ``compression.json`` and ``model.pt`` (state dict), atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.recipe.save(out / RECIPE_FILE)
        atomic_write_bytes(out / REPORT_FILE, json.dumps(self.to_dict(), indent=2, default=str).encode())
        atomic_torch_save(self.model.state_dict(), out / STATE_FILE)
        return out
