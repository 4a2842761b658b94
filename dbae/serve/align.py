"""FFHQ-style face alignment of an uploaded photo, for face models (:func:`is_face_model`).

The crop is the FFHQ dataset's (``recreate_aligned_images`` of NVIDIA's ffhq-dataset, which
DiffAE's ``align.py`` reuses): from the eye centres e_l, e_r and the mouth corners m_l, m_r,

    eye_avg = (e_l + e_r) / 2,  eye_to_eye = e_r - e_l
    eye_to_mouth = (m_l + m_r) / 2 - eye_avg
    x = eye_to_eye - rot90(eye_to_mouth);  x *= max(2 |eye_to_eye|, 1.8 |eye_to_mouth|) / |x|
    y = rot90(x);  c = eye_avg + 0.1 eye_to_mouth
    quad = (c - x - y, c - x + y, c + x + y, c + x - y)   (top-left, bottom-left, bottom-right, top-right)

and the image is resampled from that quadrilateral to the model's square.

The detector is OpenCV's Haar cascades (``opencv-python-headless`` 4.x, whose wheel ships
them under ``cv2.data.haarcascades``; OpenCV 5 no longer does): a frontal face and the two
eyes inside it. They give no mouth corners, so the mouth is placed where a face's usually
is: on the perpendicular bisector of the eyes, :data:`EYE_TO_MOUTH` eye distances below
them (the ratio of the common five-point face template: eyes 35.2 px apart, mouth centre
40.7 px below them). For most faces FFHQ's scale term is 2 |eye_to_eye| either way, so the
estimate moves only the centre (by 0.1 eye_to_mouth) and drops the mouth's share of the roll.

Without OpenCV (``pip install 'dbae[align]'``) :func:`alignment_available` is False and the
studio centre-crops, saying so.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from ..config import OFFICIAL_DBAE
from ..data.attributes import CELEBA_ATTRIBUTES

#: presets whose models were trained on FFHQ-aligned faces (the paper's and the authors' released models)
FACE_PRESETS = ("ffhq128", "celeba64", *OFFICIAL_DBAE)


def is_face_model(preset: str, attributes: Sequence[str] = ()) -> bool:
    """Whether a model's uploads are faces to align: a face preset, or a model whose attribute
    classifier has CelebA's face attributes (e.g. the authors' classifier, imported for a model
    of theirs of another layout)."""
    return preset in FACE_PRESETS or set(CELEBA_ATTRIBUTES) <= set(attributes)

#: mouth-centre distance below the eye line, in eye distances, when no mouth is detected
EYE_TO_MOUTH = 1.155


def ffhq_quad(eye_left, eye_right, mouth_left=None, mouth_right=None) -> np.ndarray:
    """(4, 2) corners of FFHQ's crop (top-left, bottom-left, bottom-right, top-right) in
    image coordinates (x right, y down). ``eye_left`` is the eye on the image's left.
    Without mouth corners, the mouth centre is estimated (see :data:`EYE_TO_MOUTH`)."""
    el, er = np.asarray(eye_left, np.float64), np.asarray(eye_right, np.float64)
    eye_avg = (el + er) * 0.5
    eye_to_eye = er - el
    if mouth_left is None or mouth_right is None:
        # the perpendicular of the eye line, pointing down the face: rot90(eye_to_eye) = (-y, x)
        eye_to_mouth = np.array([-eye_to_eye[1], eye_to_eye[0]]) * EYE_TO_MOUTH
    else:
        mouth_avg = (np.asarray(mouth_left, np.float64) + np.asarray(mouth_right, np.float64)) * 0.5
        eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    norm = np.hypot(*x)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("the eye and mouth positions do not span a face")
    x = x / norm * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def crop_quad(im: Image.Image, quad: np.ndarray, size: int) -> Image.Image:
    """The quadrilateral ``quad`` of ``im`` resampled to ``size`` x ``size`` (parts outside
    the photo come out black). Large reductions are first shrunk by whole factors, as
    FFHQ's script does, so the bilinear resampling does not alias."""
    quad = np.asarray(quad, np.float64)
    side = np.hypot(*(quad[2] - quad[0])) / np.sqrt(2)
    shrink = int(np.floor(side / size * 0.5))
    if shrink > 1:
        im = im.resize((max(1, round(im.width / shrink)), max(1, round(im.height / shrink))),
                       Image.Resampling.BOX)  # fmt: skip
        quad = quad / shrink
    # PIL's QUAD data: upper-left, lower-left, lower-right, upper-right source corners
    return im.transform((size, size), Image.Transform.QUAD, tuple((quad + 0.5).flatten()), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class Face:
    """A detected face: its box (x, y, w, h) and the eye centres, image on-screen left first
    (None when the eyes were not found inside the box)."""

    box: tuple[int, int, int, int]
    eyes: tuple[tuple[float, float], tuple[float, float]] | None


def alignment_available() -> bool:
    """True when OpenCV with its bundled Haar cascades can be imported."""
    if importlib.util.find_spec("cv2") is None:
        return False
    try:
        _cascades()
    except Exception:  # an OpenCV without the cascades (5.x), or a broken install
        return False
    return True


def why_unavailable() -> str:
    return ("face alignment is unavailable: it needs OpenCV 4 with its bundled Haar cascades "
            "(pip install 'dbae[align]'); uploads are centre-cropped")  # fmt: skip


@functools.lru_cache(maxsize=1)
def _cascades():
    import cv2

    root = cv2.data.haarcascades
    face = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
    eyes = cv2.CascadeClassifier(root + "haarcascade_eye.xml")
    if face.empty() or eyes.empty():
        raise RuntimeError(f"OpenCV's Haar cascades are missing from {root}")
    return face, eyes


def detect_face(im: Image.Image) -> Face | None:
    """The largest frontal face of ``im`` and its eyes (OpenCV Haar cascades), or None.
    Detection runs on a copy at most 640 pixels a side; positions are in ``im``'s pixels."""
    import cv2

    face_cascade, eye_cascade = _cascades()
    scale = min(1.0, 640 / max(im.size))
    small = im if scale == 1.0 else im.resize((round(im.width * scale), round(im.height * scale)),
                                              Image.Resampling.BILINEAR)  # fmt: skip
    gray = cv2.equalizeHist(np.asarray(small.convert("L")))
    faces = face_cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    if len(faces) == 0:
        return None
    x, y, w, h = max((tuple(int(v) for v in f) for f in faces), key=lambda f: f[2] * f[3])
    eyes = _eyes_in(eye_cascade, gray[y:y + h // 2 + h // 8, x:x + w], w)
    box = tuple(round(v / scale) for v in (x, y, w, h))
    if eyes is None:
        return Face(box, None)
    (lx, ly), (rx, ry) = eyes
    return Face(box, (((x + lx) / scale, (y + ly) / scale), ((x + rx) / scale, (y + ry) / scale)))


def _eyes_in(cascade, region: np.ndarray, face_width: int):
    """Centres (left, right) of the two eyes in the upper face ``region``, or None."""
    found = cascade.detectMultiScale(region, scaleFactor=1.1, minNeighbors=3,
                                     minSize=(max(8, face_width // 10),) * 2, maxSize=(face_width // 2,) * 2)  # fmt: skip
    centres = [(ex + ew / 2, ey + eh / 2, ew * eh) for ex, ey, ew, eh in found]
    left = [c for c in centres if c[0] < face_width / 2]
    right = [c for c in centres if c[0] >= face_width / 2]
    if not left or not right:
        return None
    lx, ly, _ = max(left, key=lambda c: c[2])
    rx, ry, _ = max(right, key=lambda c: c[2])
    return (lx, ly), (rx, ry)


def eyes_from_box(box: tuple[int, int, int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where the eyes of a frontal Haar face box usually are (30% / 70% across, 40% down)."""
    x, y, w, h = box
    return (x + 0.3 * w, y + 0.4 * h), (x + 0.7 * w, y + 0.4 * h)


def align_face(im: Image.Image, size: int) -> tuple[Image.Image | None, str]:
    """(the FFHQ-aligned ``size`` x ``size`` crop, or None when no face was found; a note
    saying what was done)."""
    face = detect_face(im)
    if face is None:
        return None, "no face found"
    if face.eyes is None:
        eyes, how = eyes_from_box(face.box), "face box (eyes not found)"
    else:
        eyes, how = face.eyes, "eye centres"
    return crop_quad(im, ffhq_quad(*eyes), size), f"aligned to FFHQ framing from the {how}"
