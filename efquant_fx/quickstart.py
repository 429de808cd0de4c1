"""The quickstart job: the embedded SFace teacher to W8A8 and W4A4, fine-tuned, and compared.

Without face data everything is data-free: calibration and fine-tuning images are synthesized
from the teacher's BatchNorm statistics, and the models are compared on *held-out* synthesized
images (another seed) by embedding cosine and pair-score rank agreement. With ``data`` (a folder
holding a list file ``finetune.txt`` and a pair set ``dev_pairs.bin``/``pairs.txt``, like
``$EFQUANT_SHARED/data/lfw112``) it fine-tunes on those faces and reports real pair accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from efquant_fx.errors import EfquantError
from efquant_fx.files import atomic_write_text, check_writable
from efquant_fx.pipeline import run_recipe
from efquant_fx.recipe import SHIPPED_RECIPES

VARIANTS = ("w8a8", "w4a4")
HELD_OUT_IMAGES = 32  # synthesized with another seed: never calibrated or trained on


def _recipe_path(variant: str) -> Path:
    path = SHIPPED_RECIPES / f"quickstart_{variant}.yaml"  # inside the package: any install has them
    if not path.is_file():
        raise EfquantError("quickstart recipe not found: the efquant-fx installation is incomplete", source=str(path))
    return path


def data_overrides(data: Path) -> list[str]:
    """Fine-tune on ``data``'s list file and evaluate on its pairs."""
    lists = [p for p in ("finetune.txt", "train.txt", "list.txt") if (data / p).is_file()]
    pairs = [p for p in ("dev_pairs.bin", "pairs.bin", "dev_pairs.txt", "pairs.txt") if (data / p).is_file()]
    if not data.is_dir():
        raise EfquantError("expected a folder of aligned faces", source=str(data), field="--data")
    if lists:
        source = ["kind=list", f"root={data}", f"list={data / lists[0]}"]
    else:
        source = ["kind=folder", f"root={data}"]
    overrides = [f"calibration.data={{{', '.join(s.replace('=', ': ', 1) for s in source)}}}",
                 f"finetune.data={{{', '.join(s.replace('=', ': ', 1) for s in source)}, max_images: 3000}}",
                 "calibration.images=128", "finetune.steps=40", "finetune.identities_per_batch=8",
                 "finetune.images_per_identity=4"]
    if pairs:
        p = data / pairs[0]
        if p.suffix == ".bin":
            spec = f"{{name: lfw_bin, path: '{p}'}}"
        else:
            spec = f"{{name: pairs, pairs: '{p}', root: '{data}'}}"
        overrides.append(f"eval=[{spec}]")
    return overrides


def run_quickstart(out_dir: str | Path = "runs/quickstart", data: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run both quickstart recipes; returns the comparison rows (also written to summary.json)."""
    import json

    import torch

    from efquant_fx.eval.agreement import agreement

    out = Path(out_dir)
    check_writable(out)
    rows: dict[str, Any] = {}
    held_out = None
    for variant in VARIANTS:
        t0 = time.perf_counter()
        overrides = [f"calibration.data.cache={out / 'synthetic'}", f"finetune.data.cache={out / 'synthetic'}"]
        if data is not None:
            overrides = data_overrides(Path(data))
        # the quickstart's own folders: a second quickstart replaces them, as a newcomer expects
        report = run_recipe(_recipe_path(variant), out_dir=out / variant, overrides=overrides, overwrite=True,
                            progress=progress)
        result = report.result
        row: dict[str, Any] = {"size_mib": result.size_bytes_after / 2**20,
                               "teacher_size_mib": result.size_bytes_before / 2**20,
                               "wall_s": time.perf_counter() - t0}
        if data is None:
            if held_out is None:  # a different seed from the fine-tuning images: never trained on
                from efquant_fx.data.synthetic import synthesize

                held_out = synthesize(result.teacher, HELD_OUT_IMAGES, seed=12345, cache=out / "synthetic",
                                      progress=progress)
            row.update(agreement(result.teacher, result.model, held_out))
        else:
            for role in ("teacher", "student"):
                for r in report.metrics.get(role, []):
                    row[f"{role}_{r.name}_acc"] = r.metrics.get("acc")
        row["ptq_cosine_heldout_calibration"] = result.ptq_fidelity.get("cosine_mean")
        row["finetuned_cosine_heldout_calibration"] = result.fidelity.get("cosine_mean")
        rows[variant] = row
    atomic_write_text(out / "summary.json", json.dumps({"rows": rows, "data": str(data) if data else
                                                        "synthetic (data-free)", "torch": torch.__version__},
                                                       indent=2, default=str))
    return rows
