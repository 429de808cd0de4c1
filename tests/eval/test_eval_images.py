"""Image decoding safety, alignment geometry, and path confinement."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from efquant_fx.errors import EfquantError
from efquant_fx.eval.align import ARCFACE_TEMPLATE, align_face, similarity_transform
from efquant_fx.eval.images import ImageSet, decode_image, resolve_under_root, to_face
from tests.eval.eval_helpers import face_like, save_png


def test_similarity_transform_recovers_rotation_scale_translation():
    theta, scale, t = 0.3, 1.7, np.array([5.0, -2.0])
    rot = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    src = ARCFACE_TEMPLATE
    dst = src @ rot.T + t
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)


def test_align_identity_and_integer_shift_are_exact():
    face = face_like(7)
    np.testing.assert_array_equal(align_face(face, ARCFACE_TEMPLATE), face)
    canvas = np.zeros((150, 170, 3), np.uint8)
    canvas[20:132, 33:145] = face  # loose crop: the face sits 33 px right, 20 px down
    out = align_face(canvas, ARCFACE_TEMPLATE + [33, 20])
    np.testing.assert_array_equal(out, face)


def test_align_undoes_a_2x_upscale():
    face = face_like(3)
    big = np.asarray(Image.fromarray(face).resize((224, 224), Image.Resampling.BILINEAR))
    # OpenCV convention: pixel centres at integers, so a 2x upscale maps x -> 2x + 0.5
    out = align_face(big, ARCFACE_TEMPLATE * 2 + 0.5)
    assert np.abs(out.astype(int) - face.astype(int)).mean() < 2.0


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not an image")
    with pytest.raises(EfquantError, match=r"bad.jpg: cannot decode image"):
        decode_image(bad, name=str(bad))
    good = save_png(tmp_path / "good.png", face_like(1))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(EfquantError, match=r"cut.png: cannot decode image"):
        decode_image(cut, name=str(cut))
    with pytest.raises(EfquantError, match=r"absent.png: image file not found"):
        _ = ImageSet.from_files([tmp_path / "absent.png"]).fingerprint


def test_decompression_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(bomb)  # a few kB on disk, 64 Mpixel decoded
    with pytest.raises(EfquantError, match=r"bomb.png: image (is 8000x8000|refused as a decompression bomb)"):
        decode_image(bomb, name=str(bomb))


def test_face_size_rules():
    assert to_face(np.zeros((224, 224, 3), np.uint8), name="sq").shape == (112, 112, 3)
    with pytest.raises(EfquantError, match="x: image is 120x100; expected an aligned 112x112"):
        to_face(np.zeros((100, 120, 3), np.uint8), name="x")


def test_resolve_under_root(tmp_path):
    assert resolve_under_root(tmp_path, "a/b.jpg", source="s") == tmp_path / "a" / "b.jpg"
    assert resolve_under_root(tmp_path, "a/../b.jpg", source="s") == tmp_path / "b.jpg"
    for bad in ("../x.jpg", "/etc/passwd", "a/../../x.jpg", ""):
        with pytest.raises(EfquantError):
            resolve_under_root(tmp_path, bad, source="s", field="line 1")


def test_grayscale_and_rgba_become_rgb(tmp_path):
    Image.new("L", (112, 112), 200).save(tmp_path / "g.png")
    Image.new("RGBA", (112, 112), (10, 20, 30, 40)).save(tmp_path / "a.png")
    s = ImageSet.from_files([tmp_path / "g.png", tmp_path / "a.png"])
    px = s.pixels()
    assert (
        px.shape == (2, 112, 112, 3)
        and px[0, 0, 0].tolist() == [200] * 3
        and px[1, 0, 0].tolist() == [10, 20, 30]
    )
    assert s.pixels() is px  # decoded once
