"""Calibration images from disk: an image that cannot be read is dropped, and named where the user looks."""

from __future__ import annotations

from efquant_fx.data.calibration import calibration_batches
from efquant_fx.recipe import load_recipe
from tests.test_pipeline import make_faces


def test_an_unreadable_calibration_image_is_named_in_the_notes(tmp_path):
    """Issue 16, item 10: the dropped image was only counted (and the note said 'fine-tuning')."""
    make_faces(tmp_path, identities=2, per_identity=3)
    cut = tmp_path / "id0" / "1.png"
    cut.write_bytes(cut.read_bytes()[:200])
    spec = load_recipe({"calibration": {"data": {"kind": "folder", "root": str(tmp_path)}}})
    notes: list[str] = []
    batches = calibration_batches(spec.calibration.data, 6, 4, seed=0, notes=notes)
    assert sum(b.shape[0] for b in batches) == 5
    assert len(notes) == 1, notes
    assert notes[0].startswith("calibration data: 1 of 6 selected images are unreadable and were dropped: ")
    assert f"{cut} (" in notes[0] and notes[0].endswith("; calibration uses 5")
