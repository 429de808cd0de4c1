"""A miniature IJB-C set, generated here, evaluated end to end against a port of insightface's code."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from efquant_fx.errors import EfquantError
from efquant_fx.eval import extract_embeddings, far_key, get_evaluator
from efquant_fx.eval.align import ARCFACE_TEMPLATE
from efquant_fx.eval.ijb import IJB_FARS, IJBVerification
from efquant_fx.eval.images import ImageSet
from efquant_fx.eval.metrics import tar_at_far_nearest
from tests.eval.eval_helpers import TinyNet, face_like, save_png

# identity -> templates -> media -> number of frames
LAYOUT = {
    0: [{101: 2, 102: 1}, {103: 1}],
    1: [{201: 1}, {202: 3}],
    2: [{301: 1, 302: 1}, {303: 1}],
    3: [{401: 2}, {402: 1, 403: 1}],
}


def _make_ijb(tmp_path):
    """Two copies of one set: pre-aligned 112x112 images, and loose crops with 5-point landmarks."""
    aligned, loose = tmp_path / "aligned", tmp_path / "loose"
    tid_lines, pts_lines = [], []
    templates: list[tuple[int, int]] = []  # (template id, identity)
    rng = np.random.default_rng(0)
    img_no = 0
    tid = 0
    for ident, tmpls in LAYOUT.items():
        for media in tmpls:
            tid += 1
            templates.append((tid, ident))
            for mid, frames in media.items():
                for _ in range(frames):
                    img_no += 1
                    name = f"{img_no}.png"
                    face = face_like(ident, noise=20, noise_seed=img_no)
                    save_png(aligned / "loose_crop" / name, face)
                    dx, dy = int(rng.integers(0, 30)), int(rng.integers(0, 30))
                    canvas = np.zeros((150, 160, 3), np.uint8)
                    canvas[dy : dy + 112, dx : dx + 112] = face
                    save_png(loose / "loose_crop" / name, canvas)
                    lm = (ARCFACE_TEMPLATE + [dx, dy]).reshape(-1)
                    score = rng.uniform(0.5, 1.0)
                    tid_lines.append(f"{name} {tid} {mid}")
                    pts_lines.append(" ".join([name, *(f"{v:.4f}" for v in lm), f"{score:.6f}"]))
    pair_lines = [f"{a} {b} {int(ia == ib)}" for (a, ia), (b, ib) in itertools.combinations(templates, 2)]
    for root in (aligned, loose):
        meta = root / "meta"
        meta.mkdir(parents=True)
        (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
        (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(pts_lines) + "\n")
        (meta / "ijbc_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    return aligned, loose


def _insightface_image2template_feature(img_feats, templates, medias):
    """Literal port of ``eval_ijbc.py`` (loops and all)."""
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts, strict=True):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        media_norm_feats = np.array(media_norm_feats)
        template_feats[count_template] = np.sum(media_norm_feats, axis=0)
    norms = np.linalg.norm(template_feats, axis=1, keepdims=True)
    return template_feats / norms, unique_templates


def _insightface_scores(tfeats, unique_templates, p1, p2):
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    feat1 = tfeats[template2id[p1]]
    feat2 = tfeats[template2id[p2]]
    return np.sum(feat1 * feat2, -1).flatten()


def _reference(root, model, *, norm_score, detector_score):
    meta = root / "meta"
    rows = [ln.split() for ln in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    templates = np.array([int(r[1]) for r in rows])
    medias = np.array([int(r[2]) for r in rows])
    faceness = np.array(
        [float(ln.split()[-1]) for ln in (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    )
    pairs = np.array(
        [
            [int(v) for v in ln.split()]
            for ln in (meta / "ijbc_template_pair_label.txt").read_text().splitlines()
        ]
    )
    feats = extract_embeddings(model, ImageSet.from_files([root / "loose_crop" / r[0] for r in rows]))
    img = np.concatenate([feats[:, 0], feats[:, 1]], axis=1)  # insightface's [orig | flip] rows
    d = img.shape[1] // 2
    x = (img[:, :d] + img[:, d:]).astype(np.float64)
    if not norm_score:
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if detector_score:
        x = x * faceness[:, np.newaxis]
    tfeats, uniq = _insightface_image2template_feature(x, templates, medias)
    return _insightface_scores(tfeats, uniq, pairs[:, 0], pairs[:, 1]), pairs[:, 2]


@pytest.mark.parametrize("norm_score, detector_score", [(True, True), (False, False)])
def test_mini_ijb_end_to_end(tmp_path, norm_score, detector_score):
    aligned, loose = _make_ijb(tmp_path)
    model = TinyNet(0)
    ev = IJBVerification(aligned, use_norm_score=norm_score, use_detector_score=detector_score)
    assert ev.prefix == "ijbc" and ev.mode == f"N{int(norm_score)}D{int(detector_score)}F1"
    res = ev.evaluate(model)
    scores, labels = _reference(aligned, model, norm_score=norm_score, detector_score=detector_score)
    expected = tar_at_far_nearest(labels, scores, IJB_FARS)
    for far in IJB_FARS:
        assert res.metrics[far_key(far)] == pytest.approx(expected[far])
    assert res.metrics["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert res.info["n_templates"] == 8 and res.info["n_pairs"] == 28 and res.info["n_genuine"] == 4
    # the loose crops aligned here with their 5 points give the very same pixels, hence the same metrics
    res_loose = get_evaluator(
        "ijb", root=str(loose), align=True, use_norm_score=norm_score, use_detector_score=detector_score
    ).evaluate(model)
    assert res_loose.metrics == pytest.approx(res.metrics)


def test_unaligned_loose_crops_are_refused_without_align(tmp_path):
    _, loose = _make_ijb(tmp_path)
    with pytest.raises(EfquantError, match=r"1.png: image is 160x150; expected an aligned 112x112"):
        IJBVerification(loose).evaluate(TinyNet(0))


def test_meta_file_errors_name_file_and_line(tmp_path):
    aligned, _ = _make_ijb(tmp_path)
    pts = aligned / "meta" / "ijbc_name_5pts_score.txt"
    lines = pts.read_text().splitlines()
    lines[2] = lines[2].replace("3.png", "99.png")
    pts.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        EfquantError, match=r"ijbc_name_5pts_score.txt: line 3: image '99.png' does not match"
    ):
        IJBVerification(aligned).load()
    pairs = aligned / "meta" / "ijbc_template_pair_label.txt"
    pairs.write_text("1 2 x\n")
    (aligned / "meta" / "ijbb_template_pair_label.txt").write_text("1 2 1\n")
    with pytest.raises(EfquantError, match="set prefix"):
        IJBVerification(aligned)
