"""Fixtures for evaluator tests; helpers live in ``tests.eval.eval_helpers`` for test modules to import."""

from __future__ import annotations

import pytest

from tests.eval.eval_helpers import TinyNet


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet(0).eval()
