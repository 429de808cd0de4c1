"""`CompressionResult` as a user meets it in a Python session."""

from __future__ import annotations

import pytest

from efquant_fx import compress
from tests.conftest import face_batch
from tests.export.test_export import tiny

pytestmark = pytest.mark.filterwarnings("ignore")


def test_print_result_is_one_short_line():
    """Issue 16, item 10: the dataclass repr printed both models and every report row."""
    result = compress(tiny(), {"name": "tiny_w8a8", "device": "cpu", "quant": {"weight_bits": 8, "act_bits": 8},
                               "calibration": {"images": 16, "batch_size": 8}}, calibration_data=face_batch(16))
    text = repr(result)
    assert str(result) == text and "\n" not in text and len(text) < 200
    assert text.startswith("CompressionResult(recipe='tiny_w8a8', 3/3 layers quantized, ")
    assert f"cosine {result.fidelity['cosine_mean']:.4f}" in text
