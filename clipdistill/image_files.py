"""Which files are images, with no torch import (the stages and the torch-free `predict` share
it; both decode with `preprocess.decode`)."""

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
