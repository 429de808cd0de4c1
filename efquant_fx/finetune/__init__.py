"""Fine-tune stage: distil the float teacher into the compressed student on a few thousand faces.

:func:`finetune` is the loop (checkpoints, exact resume, DDP under torchrun, NaN guard, signals);
``python -m efquant_fx.ddp`` launches it under ``torchrun``. Losses live in
:mod:`efquant_fx.finetune.losses`.
"""

from efquant_fx.data.training import RandomFaceDataset, build_training_data
from efquant_fx.finetune.trainer import (
    fidelity_evaluator,
    finetune,
    lr_factor,
)

__all__ = ["RandomFaceDataset", "build_training_data", "fidelity_evaluator", "finetune", "lr_factor"]
