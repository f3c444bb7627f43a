"""The real path at full size, on real architectures with random weights: open_clip checkpoints
saved and loaded back through the code users take, and a `dvc repro` of the paper preset
(presets/pacs_vitb32.yaml: ViT-B/32 teacher, official-layout f16 VQGAN, ResNet-18 student,
224 px, a PACS-style folder) cut to 2 synthesis steps and 1 distillation step."""
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from clipdistill.clip_models import load_open_clip, load_clip, save_clip
from clipdistill.preprocess import CLIP_MEAN, CLIP_STD
from clipdistill.shards import load_shard
from clipdistill.runtime import PipelineError

from project import ROOT, STAGES, committed_copy, ran_stages, run
from taming_official import official_model, release_config, write_release


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    """A randomly initialised ViT-B/32 (QuickGELU, as OpenAI's) saved as a local checkpoint file."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    path = tmp_path_factory.mktemp("clip") / "ViT-B-32-openai.pt"
    torch.save(model.state_dict(), path)
    return model, path


def normalise(x):
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@torch.no_grad()
def test_open_clip_local_checkpoint_loads_back_identical_with_quickgelu(vit_b32, tmp_path):
    model, path = vit_b32
    teacher = load_open_clip("ViT-B-32", str(path))
    assert teacher.image_size == 224 and teacher.embed_dim == 512
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in teacher.modules())
    x = torch.rand(2, 3, 224, 224)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    got = teacher.encode_image(x)
    # Same weights; only the order of the normalisation's float ops may differ from ours here.
    torch.testing.assert_close(got, F.normalize(model.encode_image(normalise(x)), dim=-1), rtol=0, atol=1e-6)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog."])
    assert torch.equal(teacher.encode_text(["a photo of a dog."]), F.normalize(model.encode_text(tokens), dim=-1))
    # The stage path: the teacher stage stores where the weights live; later stages reload them.
    save_clip(teacher, tmp_path / "clip.pt")
    assert torch.equal(load_clip(tmp_path / "clip.pt").encode_image(x), got)


def test_open_clip_file_without_openai_in_its_name_keeps_gelu(vit_b32, tmp_path):
    _, path = vit_b32
    other = tmp_path / "vit_b32_laion.pt"
    other.symlink_to(path)
    teacher = load_open_clip("ViT-B-32", str(other))
    assert not any(isinstance(m, open_clip.transformer.QuickGELU) for m in teacher.modules())


@pytest.mark.parametrize("name, pretrained, needle", [
    ("ViT-B-32", "data/missing/ViT-B-32-openai.pt", "data/missing/ViT-B-32-openai.pt"),
    ("ViT-B-32", "{corrupt}", "corrupt.pt"),
    ("ViT-X-99", "random", "ViT-X-99"),
])
def test_open_clip_bad_checkpoint_is_one_line_naming_it(tmp_path, name, pretrained, needle):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(PipelineError) as err:
        load_open_clip(name, pretrained.format(corrupt=tmp_path / "corrupt.pt"))
    assert needle in str(err.value) and "\n" not in str(err.value)


def pacs_like(root, classes, domains, per_class=1, seed=0):
    """<root>/<domain>/<class>/*.jpg, JPEGs of assorted sizes, as PACS holds."""
    rng = np.random.default_rng(seed)
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (int(rng.integers(180, 260)), int(rng.integers(180, 260)), 3), np.uint8)
                Image.fromarray(arr).save(root / d / c / f"{i}.jpg")


@pytest.fixture(scope="module")
def preset_project(tmp_path_factory, vit_b32):
    """The repo with presets/pacs_vitb32.yaml as params.yaml and the files it names in place:
    a PACS-style folder and the official f16 VQGAN release layout (random weights), with the
    teacher pointed at the random ViT-B/32 file (offline: no `openai` tag download)."""
    return committed_copy(tmp_path_factory.mktemp("real"), ROOT / "presets" / "pacs_vitb32.yaml")


def shrink(params: dict, clip_file) -> dict:
    """The preset with its sizes kept (224 px, ViT-B/32, f16, ResNet-18) and its counts cut."""
    params["world"].update(classes=["dog", "elephant"], eval_domains=["photo", "sketch"])
    params["threads"] = 2
    for key in ("teacher", "student_clip"):
        params[key]["pretrained"] = str(clip_file)
    params["prompts"].update(per_class=1)
    params["prompts"]["contrastive"].update(steps=1, batch_size=2)
    params["synthesize"].update(batch_size=2, shard_size=2, steps=2, cutn=2)
    params["distill"].update(epochs=1, batch_size=2, base_to_novel=False)
    params["eval"].update(batch_size=4, speed_batch=2)
    return params


def pacs_data(dst):
    """The PACS-style folder the preset reads, two classes and two domains (made once)."""
    if not (dst / "data/PACS").exists():
        pacs_like(dst / "data/PACS", ["dog", "elephant"], ["photo", "sketch"])


def test_preset_names_missing_files_with_what_to_download(preset_project, vit_b32):
    dst = preset_project
    proc = run(["dvc", "repro", "-s", "world"], dst, check=False)
    assert proc.returncode != 0
    assert "image folder not found: data/PACS" in proc.stdout + proc.stderr
    # With the images in place the world stage runs; the generator then misses the VQGAN release.
    pacs_data(dst)
    params = shrink(yaml.safe_load((dst / "params.yaml").read_text()), vit_b32[1])
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run(["dvc", "repro", "generator"], dst, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "data/vqgan_imagenet_f16_16384/configs/model.yaml" in out
    assert "vqgan_imagenet_f16_16384" in out


def test_real_architecture_smoke_run(preset_project, vit_b32):
    dst = preset_project
    pacs_data(dst)
    config = release_config("vqgan_imagenet_f16_16384")
    write_release(dst / "data" / "vqgan_imagenet_f16_16384", config, official_model(config, seed=0).state_dict())
    params = shrink(yaml.safe_load((dst / "params.yaml").read_text()), vit_b32[1])
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], dst).stdout
    assert ran_stages(out)[-(len(STAGES) - 1):] == STAGES[1:]  # `world` may have run in the missing-files test
    assert "up to date" in run(["dvc", "status"], dst).stdout
    shard = load_shard(dst / "artifacts/synth/shards/shard_00000.tar")
    assert shard["images"].shape == (2, 3, 224, 224)
    metrics = json.loads((dst / "artifacts/eval/metrics.json").read_text())
    assert set(metrics["student"]) == {"photo", "sketch", "mean"}
    speed = json.loads((dst / "artifacts/eval/speed.json").read_text())
    assert speed["image_size"] == 224
    assert speed["teacher"]["parameters"] == sum(p.numel() for p in vit_b32[0].visual.parameters())
    assert speed["student"]["parameters"] > 11_000_000  # ResNet-18 + projection head
