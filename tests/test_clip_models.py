import pytest
import torch
import torch.nn.functional as F

from project import tiny_clip

from clipdistill.clip_models import load_clip, save_clip
from clipdistill.clip_training import multi_positive_clip_loss
from clipdistill.runtime import PipelineError


def tiny(vision="convnet"):
    return tiny_clip(vision=vision, vision_width=8 if vision == "convnet" else 32)


@pytest.mark.parametrize("vision", ["convnet", "vit"])
def test_teacher_round_trip_gives_identical_features(tmp_path, vision):
    torch.manual_seed(0)
    t = tiny(vision).eval()
    save_clip(t, tmp_path / "clip.pt")
    t2 = load_clip(tmp_path)
    x = torch.rand(3, 3, 16, 16)
    t.requires_grad_(False)  # attention takes another (fused) kernel path when nothing needs grad
    assert torch.allclose(t.encode_image(x), t2.encode_image(x), atol=1e-6)
    assert torch.allclose(t.encode_text(["a photo of a star"]), t2.encode_text(["a photo of a star"]), atol=1e-6)
    assert not any(p.requires_grad for p in t2.parameters())
    # inputs of another size are resized to the teacher's
    assert t2.encode_image(torch.rand(2, 3, 40, 40)).shape == (2, 16)


def test_bad_teacher_checkpoint(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_clip(tmp_path / "missing.pt")
    (tmp_path / "clip.pt").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="unreadable"):
        load_clip(tmp_path / "clip.pt")


def test_multi_positive_loss_equals_clip_loss_when_captions_are_distinct(gen):
    img = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    tokens = torch.arange(6)[:, None].repeat(1, 4)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.t()
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    assert multi_positive_clip_loss(img, txt, tokens, scale).item() == pytest.approx(clip.item(), rel=1e-5)


def test_multi_positive_loss_hand_formula_with_duplicate_captions(gen):
    """Identical captions share the target mass: rows/cols of a duplicate pair target [.5, .5]."""
    img = F.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    tokens = torch.tensor([[5, 6], [5, 6], [7, 8]])
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    logits = 10.0 * img @ txt.t()
    hand = 0.5 * (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.t().log_softmax(1)).sum(1).mean())
    assert multi_positive_clip_loss(img, txt, tokens, torch.tensor(10.0)).item() == pytest.approx(hand.item(), rel=1e-5)


@torch.no_grad()
def test_fold_batchnorm_keeps_the_teachers_features(gen):
    from clipdistill.clip_models import fold_batchnorm

    torch.manual_seed(0)
    t = tiny()
    t.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        t.encode_image(torch.rand(8, 3, 16, 16, generator=gen))
    t.eval().requires_grad_(False)
    x = torch.rand(4, 3, 16, 16, generator=gen)
    want = t.encode_image(x)
    fold_batchnorm(t)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in t.modules())
    assert torch.allclose(t.encode_image(x), want, atol=1e-5)
    assert not any(p.requires_grad for p in t.parameters())


def test_each_clip_normalises_with_its_own_preprocess_config():
    """An open_clip model whose config has other mean/std (SigLIP-style 0.5) is normalised with
    them, by the teacher wrapper and by a prompt student built on it; the embedded one with OpenAI's."""
    import open_clip

    from clipdistill.clip_models import ClipModel, decoding
    from clipdistill.preprocess import CLIP_MEAN
    from clipdistill.prompt_students import PromptKDStudent

    model = open_clip.create_model("ViT-S-32", pretrained=None, force_preprocess_cfg={
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash", "interpolation": "bilinear"})
    clip = ClipModel(model, 224, 77, {"kind": "open_clip", "model": "ViT-S-32", "pretrained": "random"})
    assert clip.mean.flatten().tolist() == [0.5] * 3 and clip.std.flatten().tolist() == [0.5] * 3
    prep = decoding(clip, 64)
    assert (prep.size, prep.resize_mode, prep.interpolation) == (64, "squash", "bilinear")
    x = torch.rand(2, 3, 224, 224)
    assert torch.allclose(clip.preprocess(x), (x - 0.5) / 0.5)
    student = PromptKDStudent(clip, class_vectors=torch.randn(3, clip.embed_dim), logit_scale=100.0, n_prompts=1,
                              prompt_depth=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(student.preprocess(x), (x - 0.5) / 0.5)
    embedded = tiny_clip()
    assert embedded.mean.flatten().tolist() == pytest.approx(list(CLIP_MEAN))
    assert embedded.prep.resize_mode == "shortest"


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_tower_pools_before_relu_bit_for_bit(channels_last):
    """The tower's pool-then-ReLU stages give the activations and gradients (input and weights, in
    training mode) of the VGG order conv, BN, ReLU, pool exactly, ties included (a flat image)."""
    from torch import nn

    from clipdistill.clip_models import ConvImageTower

    torch.manual_seed(0)
    ours = ConvImageTower(embed_dim=8, width=8, image_size=16)
    vgg = ConvImageTower(embed_dim=8, width=8, image_size=16)
    layers = list(vgg.features)
    for i in range(0, len(layers), 4):  # conv, BN, pool, ReLU -> conv, BN, ReLU, pool
        layers[i + 2], layers[i + 3] = layers[i + 3], layers[i + 2]
    vgg.features = nn.Sequential(*layers)
    vgg.load_state_dict(ours.state_dict())  # the same keys: the swapped layers have no parameters
    assert isinstance(ours.features[2], nn.MaxPool2d) and isinstance(vgg.features[2], nn.ReLU)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours, vgg = ours.to(memory_format=fmt), vgg.to(memory_format=fmt)
    x = torch.randn(4, 3, 16, 16)
    x[0] = 0.5  # a flat image: every pool window ties
    outs, grads = [], []
    for tower in (ours, vgg):
        xi = x.clone().contiguous(memory_format=fmt).requires_grad_(True)
        out = tower(xi)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in tower.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
