"""``torchrun`` entry: compress + fine-tune with DistributedDataParallel, one process per device.

    torchrun --standalone --nproc_per_node=4 -m efquant_fx.ddp recipe.yaml --out runs/r50 [--resume]

Each rank runs the same (seeded, deterministic) PTQ, then :func:`efquant_fx.finetune.finetune` sees the
process group and trains with DDP: gloo on CPU, nccl on GPU (one GPU per rank, ``LOCAL_RANK``). Only
rank 0 writes the run directory. ``RECIPE`` is a YAML file or an inline JSON mapping; ``--model`` is a
registry name, an ONNX/MXNet file or ``package.module:factory`` (called with no arguments).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from efquant_fx.api import compress
from efquant_fx.errors import EfquantError
from efquant_fx.files import atomic_torch_save


def _recipe(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise EfquantError(f"inline recipe is not valid JSON ({exc})", field="RECIPE") from None
    return Path(text)


def _model(spec: str | None) -> Any:
    if spec is None or ":" not in spec or Path(spec).exists():
        return spec
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, AttributeError) as exc:
        raise EfquantError(f"cannot import {spec!r} ({exc})", field="--model") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m efquant_fx.ddp", description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="recipe YAML file or inline JSON mapping")
    ap.add_argument("--model", help="registry name, model file or module:factory (default: recipe model.name)")
    ap.add_argument("--out", type=Path, help="run directory (checkpoints, model.pt, compression.json)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--save-final", metavar="PATH",
                    help="every rank saves its final student state dict here ({rank} is replaced)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    rank = dist.get_rank()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = compress(_model(args.model), _recipe(args.recipe), overrides=args.set,
                          finetune_dir=args.out, resume=args.resume)
        if args.save_final:
            atomic_torch_save(result.model.state_dict(), args.save_final.replace("{rank}", str(rank)))
        if rank == 0 and args.out is not None:
            result.save(args.out)
            f = result.fidelity
            print(f"rank 0: done, teacher-student cosine {f.get('cosine_mean', float('nan')):.4f}; "
                  f"run directory {args.out}")
    except EfquantError as exc:
        print(f"rank {rank}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover - torchrun entry
    sys.exit(main())
