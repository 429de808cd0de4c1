"""The packed file as a file: compressed on disk, and refused when it would inflate like a zip bomb."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from torch import nn

from efquant_fx import EfquantError
from efquant_fx.export import read_packed


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = tmp_path / "bomb.npz"
    with open(path, "wb") as fh:  # 96 MB of zeros deflate to ~100 KB
        np.savez_compressed(fh, meta=np.zeros(4, np.uint8), big=np.zeros(96 << 20, np.uint8))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(EfquantError, match="inflate") as err:
        read_packed(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_packed_entries_are_deflated(tmp_path):
    from efquant_fx import compress
    from efquant_fx.export import save_packed
    from tests.conftest import face_batch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, stride=8)
            self.fc = nn.Linear(16 * 14 * 14, 8)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    result = compress(Net().eval(), {"device": "cpu", "quant": {"weight_bits": 4, "act_bits": 8},
                                     "calibration": {"images": 4, "batch_size": 4}},
                      calibration_data=face_batch(4, seed=0))
    rep = save_packed(result, tmp_path / "m.npz")
    with zipfile.ZipFile(rep.path) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    meta, arrays = read_packed(rep.path)
    assert meta["layers"] and any(k.startswith("packed/") for k in arrays)
