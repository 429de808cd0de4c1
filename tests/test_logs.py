"""Progress as log lines when there is no terminal (issue 16, item 3: a piped run was silent)."""

from __future__ import annotations

import logging

from efquant_fx.logs import ProgressLog, log_to_stderr


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_throttled_and_carry_rate_and_eta(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="efquant_fx"):
        lines = ProgressLog("fine-tune", 100, "step", every_s=5.0, clock=clock)
        for step in range(1, 101):
            clock.now = step * 0.5  # 2 steps/s
            lines.update(step, info=f"loss={1 / step:.3f}")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "fine-tune: 100 steps"
    assert messages[1] == "fine-tune: step 10/100 (10%), 2 step/s, ETA 45s; loss=0.100"
    assert messages[-1] == "fine-tune: step 100/100 (100%), 2 step/s, done in 50s; loss=0.010"
    assert len(messages) == 11  # the start, one line per 5 s, and the end


def test_a_resumed_loop_counts_only_its_own_steps(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="efquant_fx"):
        lines = ProgressLog("fine-tune", 1000, "step", start=900, every_s=60.0, clock=clock)
        clock.now = 200.0
        lines.update(1000)
    assert caplog.records[-1].getMessage() == "fine-tune: step 1000/1000 (100%), 0.5 step/s, done in 3m20s"


def test_the_cli_handler_shows_info_off_a_terminal_and_undoes_itself(capsys):
    logger = logging.getLogger("efquant_fx.test")
    undo = log_to_stderr(show_info=True)
    try:
        logger.info("calibrating")
        logger.warning("step 5: loss is NaN/inf")
    finally:
        undo()
    logger.info("not shown once undone")
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == ["calibrating", "warning: step 5: loss is NaN/inf"]
    undo = log_to_stderr(show_info=False)  # a terminal: the bars show progress, the log only warnings
    try:
        logger.info("hidden")
        logger.warning("shown")
    finally:
        undo()
    assert [line.split(" ", 1)[1] for line in capsys.readouterr().err.splitlines()] == ["warning: shown"]
