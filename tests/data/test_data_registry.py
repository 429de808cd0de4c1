"""One registry for every data kind: built-ins, a plugin kind through recipe validation, calibration and training."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from efquant_fx import EfquantError, RecipeError, load_recipe
from efquant_fx.data import (
    DATASET_KINDS,
    BuildContext,
    DataReport,
    FaceDataset,
    build_data,
    get_dataset_kind,
    list_dataset_kinds,
    register_dataset_kind,
    unregister_dataset_kind,
)
from efquant_fx.data.calibration import calibration_batches
from efquant_fx.data.training import build_training_data
from efquant_fx.recipe import DataSpec, FinetuneConfig
from tests.data.conftest import jpeg_bytes


@pytest.fixture
def restore_kinds():
    """Whatever a test registers or removes, the registry is as before afterwards."""
    saved = dict(DATASET_KINDS)
    yield
    DATASET_KINDS.clear()
    DATASET_KINDS.update(saved)


class ColourFaces(FaceDataset):
    """A plugin's dataset that reads images: ``n`` encoded images, two per identity, one of them broken."""

    def __init__(self, n: int, transform, seed: int):
        report = DataReport(source=f"colours(n={n})", kind="colours", listed=n)
        super().__init__(list(range(n)), [i // 2 for i in range(n)], report, transform=transform, seed=seed)

    def read_bytes(self, key: Any) -> bytes:
        return b"not an image" if key == 3 else jpeg_bytes((10 * key % 256, 40, 90))


def register_plugins() -> None:
    @register_dataset_kind("colours", keys=("n",))
    def colours(spec: dict[str, Any], ctx: BuildContext) -> FaceDataset:
        return ColourFaces(spec.get("n", 12), ctx.transform, ctx.seed)

    @register_dataset_kind("teacher_noise", keys=("n",), generated=True, needs_teacher=True, identities=False,
                           default_n=5)
    def teacher_noise(spec: dict[str, Any], ctx: BuildContext) -> FaceDataset:
        from efquant_fx.data.random import RandomImages

        assert ctx.teacher is not None and ctx.n is not None
        return RandomImages(ctx.n, ctx.seed)


def test_builtin_kinds_are_registered_alike():
    assert {"folder", "list", "recordio", "random", "synthetic"} <= set(list_dataset_kinds())
    synthetic, random = get_dataset_kind("synthetic"), get_dataset_kind("random")
    assert synthetic.generated and synthetic.needs_teacher and not synthetic.identities and synthetic.default_n
    assert random.generated and random.identities and not random.needs_teacher
    assert not get_dataset_kind("folder").generated and get_dataset_kind("list").required == {"list"}
    with pytest.raises(KeyError, match="unknown data kind 'zip'; known: folder"):
        get_dataset_kind("zip")


def test_random_calibration_noise_is_drawn_from_the_seed():
    batches = calibration_batches(DataSpec(kind="random", n=7), images=10, batch_size=4, seed=3)
    expected = torch.rand(7, 3, 112, 112, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert [b.shape[0] for b in batches] == [4, 3] and torch.equal(torch.cat(batches), expected)
    dataset, report, has_ids = build_training_data(FinetuneConfig(identities_per_batch=2, images_per_identity=2),
                                                   None, 5)
    assert len(dataset) == 32 and dataset.seed == 5 and has_ids and report.kind == "random"


def test_plugin_kind_through_recipe_calibration_and_training(restore_kinds):
    with pytest.raises(RecipeError, match="calibration.data.kind: Input should be a registered data kind: .*'folder'"):
        load_recipe({"calibration": {"data": {"kind": "colours"}}})
    register_plugins()
    data = {"kind": "colours", "n": 10, "max_images": 8, "verify": "decode"}
    recipe = load_recipe({"calibration": {"images": 5, "batch_size": 2, "data": data},
                          "finetune": {"data": data, "identities_per_batch": 2, "images_per_identity": 2}})
    assert recipe.calibration.data.kind == "colours"
    assert recipe.calibration.data.dataset_fields()["n"] == 10  # the kind takes n, so it is passed on

    batches = calibration_batches(recipe.calibration.data, recipe.calibration.images, 2, seed=0)
    assert [b.shape for b in batches] == [(2, 3, 112, 112)] * 2 + [(1, 3, 112, 112)]
    again = calibration_batches(recipe.calibration.data, recipe.calibration.images, 2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))

    dataset, report, has_ids = build_training_data(recipe.finetune, None, recipe.seed)
    assert has_ids and isinstance(dataset, ColourFaces)
    assert (report.listed, report.selected, report.unreadable, report.loaded) == (10, 8, 1, 7)
    image, label = dataset[0]
    assert image.shape == (3, 112, 112) and 0 <= label < dataset.num_classes

    unregister_dataset_kind("colours")
    with pytest.raises(RecipeError, match="registered data kind"):
        load_recipe({"finetune": {"data": data}})


def test_generated_plugin_kind_needs_the_teacher(restore_kinds):
    register_plugins()
    spec = load_recipe({"calibration": {"data": {"kind": "teacher_noise"}}}).calibration.data
    with pytest.raises(EfquantError, match="calibration.data.kind: kind 'teacher_noise' needs the teacher"):
        calibration_batches(spec, images=4, batch_size=4, seed=0)
    teacher = torch.nn.Identity()
    batches = calibration_batches(spec, images=6, batch_size=4, seed=0, teacher=teacher)
    assert [b.shape[0] for b in batches] == [4, 2]  # calibration makes calibration.images
    dataset, _report, has_ids = build_training_data(FinetuneConfig(data=spec), teacher, 0)
    assert len(dataset) == 5 and not has_ids  # the kind's default_n; one label per image


def test_registry_refuses_duplicates_and_builder_unknown_kinds(restore_kinds):
    with pytest.raises(ValueError, match="already registered"):
        register_dataset_kind("folder")(lambda spec, ctx: None)
    with pytest.raises(EfquantError, match=r"finetune.data.kind: unknown kind 'zip'; known: folder, list"):
        build_data({"kind": "zip"}, prefix="finetune.data")
