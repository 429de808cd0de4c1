"""The fine-tune progress off a terminal: log lines instead of a bar that shows nothing (issue 16, item 3)."""

from __future__ import annotations

import logging

from efquant_fx.finetune.progress import Progress


def row(step: int) -> dict:
    return {"kind": "train", "step": step, "epoch": 0, "lr": 1e-3, "images_per_s": 50.0, "loss": 0.5, "kd_mse": 0.25}


def test_off_a_terminal_the_fine_tune_logs_its_steps(caplog):
    with caplog.at_level(logging.INFO, logger="efquant_fx"), Progress(4, 0, True, terminal=False) as bar:
        for step in range(1, 5):
            bar.update(row(step))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "fine-tune: 4 steps"
    assert messages[-1].startswith("fine-tune: step 4/4 (100%)")
    assert "loss=0.5 kd_mse=0.25 lr=1.00e-03 50.0 img/s" in messages[-1]


def test_other_ranks_and_disabled_progress_stay_quiet(caplog):
    with caplog.at_level(logging.INFO, logger="efquant_fx"), Progress(4, 0, False, terminal=False) as bar:
        bar.update(row(4))
    assert not caplog.records
