import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.data import check_readable, load_domain_folder
from clipdistill.image_sets import decode_all
from clipdistill.preprocess import clip_default
from clipdistill.runtime import PipelineError, atomic_dir
from clipdistill.shards import load_shard, save_shard, shard_ranges


def make_folder(root, domains=("photo",), classes=("circle", "star"), n=2):
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20, 20, 3), i * 40, np.uint8)).save(root / d / c / f"{i}.png")


def test_domain_folder_loads_labels_by_class_name(tmp_path):
    make_folder(tmp_path, domains=("photo", "sketch"), classes=("star", "circle"))
    data = load_domain_folder(tmp_path, ["circle", "star", "heart"], clip_default(16))
    photo = decode_all(data["photo"], workers=0)
    assert photo.images.shape == (4, 3, 16, 16) and photo.images.dtype == torch.uint8
    assert sorted(photo.labels.tolist()) == [0, 0, 1, 1]


@pytest.mark.parametrize("problem, needle", [
    ("missing", "image folder not found"),
    ("corrupt", "corrupt or unreadable image"),
    ("empty", "no images found"),
    ("foreign_class", "is not in world.classes"),
    ("no_class_folder", "has no class folder"),
    ("file", "is a file, not a folder"),
])
def test_bad_folders_fail_naming_the_path(tmp_path, problem, needle):
    root = tmp_path / "data"
    if problem == "file":
        tmp_path.joinpath("data").write_text("x")
    elif problem != "missing":
        make_folder(root)
    if problem == "corrupt":
        (root / "photo" / "star" / "bad.png").write_bytes(b"nope")
    if problem == "empty":
        for f in root.rglob("*.png"):
            f.unlink()
    if problem == "foreign_class":
        (root / "photo" / "dog").mkdir()
    if problem == "no_class_folder":
        for f in root.rglob("*.png"):
            f.rename(root / "photo" / f"{f.parent.name}_{f.name}")
        for d in ("circle", "star"):
            (root / "photo" / d).rmdir()
    with pytest.raises(PipelineError, match=needle) as err:
        for images in load_domain_folder(root, ["circle", "star"], clip_default(16)).values():
            check_readable(images, workers=0)
    assert "\n" not in str(err.value)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "done.txt").write_text("x")
    assert (out / "done.txt").is_file()


def test_shards_round_trip_and_corrupt_shard_is_redone(tmp_path):
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    save_shard(tmp_path / "s.tar", images, ["000000007", "000000008"], prompt_ids=torch.tensor([7, 8]),
               confidence=torch.tensor([0.25, 0.125]))
    shard = load_shard(tmp_path / "s.tar")
    assert torch.equal(shard["images"], images) and shard["prompt_ids"].tolist() == [7, 8]
    assert shard["confidence"].tolist() == [0.25, 0.125] and shard["keys"] == ["000000007", "000000008"]
    (tmp_path / "t.tar").write_bytes((tmp_path / "s.tar").read_bytes()[:700])
    assert load_shard(tmp_path / "t.tar") is None and load_shard(tmp_path / "absent.tar") is None
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
