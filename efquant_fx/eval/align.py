"""Five-point face alignment onto the ArcFace 112x112 template (numpy least squares + Pillow warp).

Matches insightface's ``face_align.norm_crop``: a similarity transform (rotation, uniform scale,
translation; the Umeyama least-squares fit, which for similarities is an ordinary linear least-squares
problem in ``a = s cos t, b = s sin t, tx, ty``), bilinear sampling (rounded, not truncated),
black border. Coordinates follow OpenCV's convention (pixel centres at integers), as detector
landmarks do.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: insightface ``arcface_dst``: left eye, right eye, nose tip, left and right mouth corners.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity matrix mapping ``src`` points onto ``dst`` in the least-squares sense."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    n = src.shape[0]
    a = np.zeros((2 * n, 4))
    a[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], axis=1)
    a[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], axis=1)
    (ca, cb, tx, ty), *_ = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)
    return np.array([[ca, -cb, tx], [cb, ca, ty]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp an RGB uint8 ``HxWx3`` image so that its five ``landmarks`` land on the ArcFace template."""
    if size % 112 != 0:
        raise ValueError("size must be a multiple of 112")
    m = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / 112.0))
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    # Pillow samples output pixel (x, y) at continuous (x + .5, y + .5) and reads input the same way;
    # shift so the OpenCV-convention matrix applies to pixel centres.
    a, b, c = inv[0]
    d, e, f = inv[1]
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    # Warp each channel as a float image and round, as OpenCV does; 8-bit Pillow warps truncate.
    src = np.asarray(image, dtype=np.float32)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(src[:, :, c]), mode="F").transform(
                (size, size),
                Image.Transform.AFFINE,
                data=coeffs,
                resample=Image.Resampling.BILINEAR,
                fillcolor=0.0,
            )
        )
        for c in range(3)
    ]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
