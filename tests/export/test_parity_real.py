"""Issue 6's parity check on real teachers and real faces (needs ../shared; skipped without it).

SFace must meet the issue's target (embedding cosine >= 0.995 to the fake-quant model, pair
accuracy within 0.1 point). MobileFaceNet-y1 W8A8 is so sensitive that the same fake-quant model
run in float64 is only ~0.995 from itself: there the int8 ONNX must come within 0.005 of that floor
and change at most one pair's decision. ``benchmarks/deploy_parity.py`` measures both on 600 pairs.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

from efquant_fx import compress
from efquant_fx.export import export_model
from efquant_fx.export.parity import cosine, run, session
from tests.conftest import REPO, shared_dir

pytestmark = [pytest.mark.real_data, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
POINTS = ["compute_input", "compute_output", "prelu", "residual_add"]


def lfw() -> tuple:
    root = shared_dir() / "data" / "lfw112"
    if not (root / "dev_pairs.txt").is_file():
        pytest.skip("real data not available (set EFQUANT_SHARED)")
    from efquant_fx.eval.embed import preprocess
    from efquant_fx.eval.images import ImageSet
    from efquant_fx.eval.pairs import read_pairs

    pairs = read_pairs(root / "dev_pairs.txt", root / "images")
    keep = range(0, len(pairs.left), 12)  # 150 pairs, each fold keeps its share
    left, right = [pairs.left[i] for i in keep], [pairs.right[i] for i in keep]
    files = sorted(set(left) | set(right))
    index = {f: i for i, f in enumerate(files)}
    x = preprocess(ImageSet.from_files(files).pixels(progress=False))
    issame = np.array([pairs.issame[i] for i in keep], dtype=bool)
    return root, x, np.array([index[f] for f in left]), np.array([index[f] for f in right]), issame


def pair_accuracy(emb: np.ndarray, left, right, issame) -> float:
    from efquant_fx.eval.verification import verification_result

    res = verification_result("dev", "lfw_bin", emb[:, None, :], left, right, issame, n_folds=3, flip=False)
    return 100 * res.metrics["acc"]


def teacher(name: str):
    """The real teacher, loaded as the benchmarks load it (``benchmarks/_common.load_teacher``)."""
    models = shared_dir() / "models"
    needed = {"sface": models / "sface" / "face_recognition_sface_2021dec_int8bq.onnx",
              "mobilefacenet": models / "insightface_mobilefacenet_y1"}[name]
    if not needed.exists():
        pytest.skip(f"{name} weights not under {models}")
    spec = importlib.util.spec_from_file_location("benchmarks_common", REPO / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.load_teacher(name, shared_dir())


def embed(fn, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([fn(x[i:i + batch]).float().numpy() for i in range(0, len(x), batch)])


@pytest.mark.parametrize("name", ["sface", "mobilefacenet"])
def test_int8_onnx_matches_the_fake_quant_model_on_real_faces(name, tmp_path):
    root, x, left, right, issame = lfw()
    data = {"kind": "list", "list": str(root / "finetune.txt"), "root": str(root)}
    recipe = {"device": "cpu", "seed": 0, "calibration": {"images": 128, "batch_size": 32, "data": data},
              "quant": {"observer": "percentile", "batchnorm": "keep", "act_points": POINTS}}
    result = compress(teacher(name), recipe)
    rep = export_model(result, tmp_path, formats="onnx_qcdq")["onnx_qcdq"]
    assert rep.added_output_points == 0
    model = result.model.eval()
    ref = embed(model, x)
    got = np.concatenate([run(session(rep.path, "enable_all", threads=2), x[i:i + 64])
                          for i in range(0, len(x), 64)])
    cos = float(cosine(torch.from_numpy(got), torch.from_numpy(ref)).mean())
    acc_ref, acc_got = pair_accuracy(ref, left, right, issame), pair_accuracy(got, left, right, issame)
    if name == "sface":
        assert cos >= 0.995
    else:
        double = copy.deepcopy(model).double()
        floor = float(cosine(torch.from_numpy(embed(lambda t: double(t.double()), x[:64])),
                             torch.from_numpy(ref[:64])).mean())
        assert cos >= floor - 0.005, (cos, floor)
    # 150 pairs resolve 0.67 points: the issue's 0.1-point bound (meant for all 1,800) means "no pair
    # changes its decision" here, and a float64 rerun of MobileFaceNet already changes one or two
    one_pair = 100 / len(issame)
    assert abs(acc_got - acc_ref) <= (0.1 if name == "sface" else one_pair) + 1e-9, (acc_got, acc_ref)
