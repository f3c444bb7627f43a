"""Streaming image sets: folders and WebDataset tars decode as RAM tensors do, and training on a
streamed set takes exactly the steps training from RAM takes, whatever the worker count."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.data import file_decoder, load_unlabeled
from clipdistill.image_sets import (EpochReader, Files, Tensors, batches, decode_all, expand_shards, fit_in_memory,
                                    sequential)
from clipdistill.losses import get_loss
from clipdistill.preprocess import clip_default
from clipdistill.resumable import EpochOrder
from clipdistill.runtime import PipelineError
from clipdistill.training import distill

SIZE = 12


def write_images(root, n, seed=0):
    """n random PNGs root/<class>/<i>.png (classes circle, star alternating); their pixels."""
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(n):
        cls = ("circle", "star")[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / cls / f"{i:03d}.png")
        arrays.append(a)
    return arrays


def write_tars(folder, arrays, per_shard, labels=True):
    """WebDataset shards folder/{00000..}.tar of <key>.png (+ <key>.cls), as img2dataset writes them."""
    for s in range(0, len(arrays), per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(arrays))):
                buf = io.BytesIO()
                Image.fromarray(arrays[i]).save(buf, format="PNG")
                members = {f"{i:06d}.png": buf.getvalue()}
                if labels:
                    members[f"{i:06d}.cls"] = str(i % 2).encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_tars_and_folders_decode_to_the_same_tensors_with_labels(tmp_path):
    arrays = write_images(tmp_path / "folder", 10)
    (tmp_path / "tars").mkdir()
    write_tars(tmp_path / "tars", arrays, per_shard=4)
    prep = clip_default(SIZE)
    tars = load_unlabeled(str(tmp_path / "tars" / "{00000..00002}.tar"), ["circle", "star"], prep)
    assert len(tars) == 10 and tars.labels.tolist() == [i % 2 for i in range(10)]
    expected = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    assert torch.equal(decode_all(tars, workers=0).images, expected)
    folder = load_unlabeled(tmp_path / "folder", ["circle", "star"], prep)
    order = sorted(range(10), key=lambda i: (i % 2, i))  # sorted by path: circle/..., star/...
    assert torch.equal(decode_all(folder, workers=2).images, expected[order])
    assert folder.labels.tolist() == [i % 2 for i in order]


def test_shard_patterns_expand_ranges_and_globs(tmp_path):
    assert [p.name for p in expand_shards(str(tmp_path / "{0008..0011}.tar"))] == [
        "0008.tar", "0009.tar", "0010.tar", "0011.tar"]
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_shards(str(tmp_path / "*.tar"))] == ["a.tar", "b.tar"]


@pytest.mark.parametrize("problem, needle", [("missing", "tar shard not found"), ("corrupt", "is unreadable"),
                                             ("no_images", "no images in the tar shards")])
def test_bad_tar_input_is_one_line_naming_it(tmp_path, problem, needle):
    if problem == "corrupt":
        (tmp_path / "00000.tar").write_bytes(b"this is no tar file" * 40)
    if problem == "no_images":
        with tarfile.open(tmp_path / "00000.tar", "w") as tar:
            info = tarfile.TarInfo("000.txt")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(PipelineError, match=needle) as err:
        load_unlabeled(str(tmp_path / "00000.tar"), ["circle"], clip_default(SIZE))
    assert "\n" not in str(err.value)


def test_a_corrupt_image_in_a_streamed_set_names_the_file(tmp_path):
    write_images(tmp_path, 4)
    (tmp_path / "star" / "001.png").write_bytes(b"not a png")
    images = load_unlabeled(tmp_path, ["circle", "star"], clip_default(SIZE))
    with pytest.raises(PipelineError, match=r"corrupt or unreadable image: .*star/001.png"):
        list(batches(images, sequential(len(images), 2), workers=0))


def test_memory_budget_decides_between_ram_and_streaming(tmp_path):
    write_images(tmp_path, 6)
    images = load_unlabeled(tmp_path, ["circle", "star"], clip_default(SIZE))
    assert isinstance(fit_in_memory(images, budget_mb=1, workers=0, what="t"), Tensors)
    assert isinstance(fit_in_memory(images, budget_mb=0, workers=0, what="t"), Files)


def test_epoch_reader_resumes_mid_epoch_on_the_same_batches(tmp_path):
    write_images(tmp_path, 10)
    images = load_unlabeled(tmp_path, ["circle", "star"], clip_default(SIZE))
    order = EpochOrder(len(images), 3, torch.Generator().manual_seed(0))
    reader = EpochReader(images, order, workers=2)
    full = [reader.batch(s) for s in range(6)]  # 2 epochs of 3 steps
    resumed_order = EpochOrder(len(images), 3, torch.Generator())
    resumed_order.load_state_dict(order.state_dict())  # state after step 5: epoch 1's permutation
    resumed = EpochReader(images, resumed_order, workers=0)
    idx, x = resumed.batch(4)
    assert torch.equal(idx, full[4][0]) and torch.equal(x, full[4][1])
    ram = decode_all(images, workers=0)
    for idx, x in full:
        assert torch.equal(x, ram.images[idx])


class TinyStudent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)


def test_training_on_a_streamed_set_takes_the_steps_training_from_ram_takes(tmp_path):
    """Same seed: the same losses and weights from RAM, and streamed by 0 or 2 workers."""
    arrays = write_images(tmp_path / "folder", 16)
    (tmp_path / "tars").mkdir()
    write_tars(tmp_path / "tars", arrays, per_shard=5, labels=False)
    prep = clip_default(SIZE)
    tars = load_unlabeled(str(tmp_path / "tars" / "*.tar"), [], prep)
    teacher = torch.nn.Conv2d(3, 2, SIZE)
    runs = []
    for images, workers in ((decode_all(tars, 0), 0), (tars, 0), (tars, 2)):
        torch.manual_seed(0)
        student = TinyStudent()
        losses, _ = distill(student, lambda x: teacher(x).flatten(1), images, get_loss("kl", 1.0), temperature=2.0,
                            epochs=2, batch_size=4, lr=0.01, weight_decay=0.0, augment=True,
                            generator=torch.Generator().manual_seed(1), device=torch.device("cpu"), workers=workers)
        runs.append((losses, student.state_dict()))
    for losses, state in runs[1:]:
        assert losses == runs[0][0]
        assert all(torch.equal(state[k], runs[0][1][k]) for k in state)


def test_file_decoder_follows_the_teachers_geometry(tmp_path):
    """A non-square file is resized on its shorter side and centre-cropped (CLIP), not squashed."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 255  # a white centre band 20 px wide
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = file_decoder(clip_default(20))(tmp_path / "wide.png")
    assert x.shape == (20, 20, 3) and x.min() == 255  # the centre crop is all band


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_leaves_the_global_rng_alone(tmp_path, workers):
    """Decoding a set (a DataLoader starting) must not advance torch's global RNG, which model
    initialisation reads afterwards: the same seed must build the same student."""
    write_images(tmp_path, 4)
    images = load_unlabeled(tmp_path, ["circle", "star"], clip_default(SIZE))
    torch.manual_seed(0)
    decode_all(images, workers=workers)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_a_stream_gives_freed_heap_memory_back_every_few_batches(tmp_path, monkeypatch):
    import clipdistill.image_sets as image_sets
    calls = []
    monkeypatch.setattr(image_sets, "release_free_memory", lambda: calls.append(1) or True)
    write_images(tmp_path, 10)
    streamed = load_unlabeled(tmp_path, ["circle", "star"], clip_default(SIZE))
    assert len(list(batches(streamed, sequential(10, 1), workers=0))) == 10
    assert len(calls) == 10 // image_sets.TRIM_EVERY  # every TRIM_EVERY streamed batches (per-thread arenas keep them)
    list(batches(Tensors(torch.zeros(10, 3, SIZE, SIZE, dtype=torch.uint8)), sequential(10, 1), workers=0))
    assert len(calls) == 10 // image_sets.TRIM_EVERY  # in-RAM sets allocate nothing per batch to give back
