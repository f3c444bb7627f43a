"""Reading image files as the pipeline sees them, with Pillow and numpy only (no torch), so that
`predict` and the stages decode and resize every image the same way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def decode_rgb(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: converted to RGB, resized bicubically to size x size when it is
    not already. Pillow's errors (OSError, UnidentifiedImageError, ...) propagate."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)
