"""Folder and list-file datasets on tiny generated images, bad files, transforms, build_dataset."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from efquant_fx.data import FaceTransform, ListFileDataset, build_dataset, decode_image
from efquant_fx.data.transforms import MAX_IMAGE_PIXELS, UnreadableImage
from efquant_fx.errors import EfquantError


@pytest.fixture
def face_folder(tmp_path, make_image, jpeg):
    root = tmp_path / "faces"
    make_image(root / "bob" / "0.jpg", (10, 200, 10))
    make_image(root / "alice" / "0.jpg", (200, 10, 10))
    make_image(root / "alice" / "1.png", (200, 10, 10), size=96, fmt="PNG")  # resized to 112
    data = jpeg((5, 5, 5))
    (root / "bob" / "truncated.jpg").write_bytes(data[: data.index(b"\xff\xda") + 20])  # header intact
    (root / "bob" / "notes.jpg").write_text("not an image")
    (root / "alice" / "landmarks.txt").write_text("1 2 3")  # ignored: not an image extension
    (root / "README").write_text("top-level file")  # ignored
    (root / ".cache").mkdir()  # hidden: skipped silently
    return root


def test_folder_counts_bad_files_and_labels_sorted(face_folder):
    dataset, report = build_dataset({"kind": "folder", "root": str(face_folder)}, train=False)
    assert (report.listed, report.selected, report.loaded, report.unreadable, report.ignored) == (
        5,
        5,
        3,
        2,
        2,
    )
    assert any("notes.jpg" in p for p in report.unreadable_paths)
    assert any("truncated.jpg" in p for p in report.unreadable_paths)
    assert dataset.label_names == ["alice", "bob"] and dataset.labels == [0, 0, 1]
    assert "unreadable 2" in report.summary() and "dropped" in report.summary()
    for i in range(len(dataset)):
        image, _ = dataset[i]
        assert image.shape == (3, 112, 112) and image.dtype == torch.float32


def test_header_validation_then_substitution_at_read_time(face_folder):
    dataset, report = build_dataset(
        {"kind": "folder", "root": str(face_folder), "validate": "header"}, train=False
    )
    assert report.unreadable == 1  # the text file; the truncated JPEG passes a header check
    index = dataset.keys.index("bob/truncated.jpg")
    image, label = dataset[index]  # substituted by bob/0.jpg (same identity), not a crash
    assert label == dataset.labels[index] and image.shape == (3, 112, 112)
    assert report.substituted == 1


def test_decompression_bomb_is_unreadable(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side)).save(path)
    with pytest.raises(UnreadableImage, match="pixel"):
        decode_image(path)
    with pytest.raises(UnreadableImage):
        decode_image(b"")


def test_transform_values_and_seeded_flip(jpeg):
    img = decode_image(jpeg((255, 255, 255)))  # left half black, right half white
    x = FaceTransform(train=False)(img)
    assert x.shape == (3, 112, 112)
    assert x[:, 50, 0].tolist() == pytest.approx([-1.0] * 3, abs=0.02)
    assert x[:, 50, -1].tolist() == pytest.approx([1.0] * 3, abs=0.02)
    flips = [
        bool(FaceTransform(train=True)(img, torch.Generator().manual_seed(s))[0, 50, 0] > 0)
        for s in range(20)
    ]
    assert flips == [
        bool(FaceTransform(train=True)(img, torch.Generator().manual_seed(s))[0, 50, 0] > 0)
        for s in range(20)
    ]
    assert 0 < sum(flips) < 20


def test_dataset_augmentation_reproducible_and_epoch_dependent(face_folder):
    dataset, _ = build_dataset({"kind": "folder", "root": str(face_folder), "seed": 5}, train=True)

    def flips():
        return [bool(dataset[i][0][0, 50, 0] > 0) for i in range(len(dataset))]

    per_epoch = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        per_epoch.append(flips())
        assert flips() == per_epoch[-1]
    assert len({tuple(f) for f in per_epoch}) > 1


def test_list_file_parsing_and_errors(tmp_path, make_image):
    root = tmp_path / "lfw"
    make_image(root / "images" / "A B" / "a 1.jpg")
    make_image(root / "images" / "C" / "c.jpg", (1, 2, 3))
    listing = root / "finetune.txt"
    listing.write_text("# comment\n\nimages/A B/a 1.jpg\t4\nimages/C/c.jpg   9\nimages/missing.jpg\t9\n")
    dataset, report = build_dataset(
        {"kind": "list", "list": "lfw/finetune.txt"}, base_dir=tmp_path, train=False
    )
    assert (report.listed, report.loaded, report.unreadable) == (3, 2, 1)
    assert dataset.labels == [0, 1] and dataset.label_names == ["4", "9"]
    assert dataset[1][0].shape == (3, 112, 112)

    for line, field in [
        ("../outside.jpg\t0", "path"),
        ("/etc/passwd\t0", "path"),
        ("images/x/../../../y.jpg 1", "path"),
        ("images/C/c.jpg\tx", "label"),
        ("images/C/c.jpg\t-1", "label"),
        ("lonely", "line"),
    ]:
        listing.write_text(f"images/C/c.jpg\t0\n{line}\n")
        with pytest.raises(EfquantError) as info:
            ListFileDataset(listing)
        assert f"finetune.txt:2: {field}:" in str(info.value)


def test_build_dataset_spec_errors(tmp_path):
    with pytest.raises(EfquantError, match=r"recipe.yaml: data.kind: unknown kind 'zip'"):
        build_dataset({"kind": "zip"}, source="recipe.yaml")
    with pytest.raises(EfquantError, match=r"data.colour: unknown key"):
        build_dataset({"kind": "folder", "root": str(tmp_path), "colour": 1})
    with pytest.raises(EfquantError, match=r"data.root: required"):
        build_dataset({"kind": "folder"})
    with pytest.raises(EfquantError, match=r"data.validate"):
        build_dataset({"kind": "folder", "root": str(tmp_path), "validate": "maybe"})
    with pytest.raises(EfquantError, match="image folder not found"):
        build_dataset({"kind": "folder", "root": str(tmp_path / "nope")})
