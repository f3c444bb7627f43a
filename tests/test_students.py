import pytest
import torch
import torch.nn.functional as F

from clipdistill.runtime import PipelineError
from clipdistill.students import CnnStudent, load_student, save_student


@pytest.mark.parametrize("head", ["projection", "linear"])
def test_student_logits_shape_and_round_trip(tmp_path, head, gen):
    vectors = F.normalize(torch.randn(5, 12, generator=gen), dim=-1)
    s = CnnStudent(vectors, 50.0, head=head, width=8, depth=1, backbone="cifar_resnet").eval()
    x = torch.rand(3, 3, 16, 16, generator=gen)
    out = s(x)
    assert out.shape == (3, 5)
    save_student(s, tmp_path / "s.pt")
    assert torch.equal(load_student(tmp_path / "s.pt")(x), out)


def test_projection_head_classifies_against_the_stored_vectors(gen):
    vectors = F.normalize(torch.randn(4, 12, generator=gen), dim=-1)
    s = CnnStudent(vectors, 100.0, head="projection", width=8, depth=1, backbone="cifar_resnet").eval()
    x = torch.rand(2, 3, 16, 16, generator=gen)
    feats = F.normalize(s.head(s.backbone((x - s.mean) / s.std)), dim=-1)
    assert torch.allclose(s(x), 100.0 * feats @ vectors.t(), atol=1e-5)
    # logits are bounded by the scale: they are scaled cosines
    assert s(x).abs().max() <= 100.0 + 1e-4


def test_bad_student_checkpoint(tmp_path):
    (tmp_path / "s.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="s.pt"):
        load_student(tmp_path / "s.pt")


def test_resnet18_student_is_torchvisions_and_round_trips(tmp_path, gen):
    vectors = F.normalize(torch.randn(3, 16, generator=gen), dim=-1)
    s = CnnStudent(vectors, 100.0, head="projection", width=0, depth=0, backbone="resnet18").eval()
    # torchvision's ResNet-18 has 11,689,512 parameters, 513,000 of them in the ImageNet classifier we drop
    assert sum(p.numel() for p in s.backbone.parameters()) == 11_689_512 - 513_000
    x = torch.rand(2, 3, 64, 64, generator=gen)
    out = s(x)
    assert out.shape == (2, 3)
    save_student(s, tmp_path / "r18.pt")
    again = load_student(tmp_path / "r18.pt")
    assert again.backbone_name == "resnet18" and torch.equal(again(x), out)


def test_feature_distillation_moves_the_projection_onto_the_teachers_features(gen):
    """distill with feature_l2: the student's projection approaches the teacher's unit-norm image
    features, and its logits are the ones `forward` gives."""
    from clipdistill.losses import Outputs, get_loss
    from clipdistill.training import distill

    vectors = F.normalize(torch.randn(3, 6, generator=gen), dim=-1)
    student = CnnStudent(vectors, 20.0, head="projection", width=8, depth=1, backbone="cifar_resnet")
    mix = torch.randn(3, 6, generator=gen)

    def teacher(x):  # a fixed "image tower": unit-norm features of the channel means
        feature = F.normalize(x.mean((2, 3)) @ mix, dim=-1)
        return Outputs(20.0 * feature @ vectors.t(), feature)

    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=gen)
    x = images.float().div(255)

    def distance():
        student.eval()
        with torch.no_grad():
            out = student(x, features=True)
            assert torch.equal(out.logits, student(x))
            return float((out.features - teacher(x).features).square().sum(-1).mean())

    before = distance()
    distill(student, teacher, images, get_loss("feature_l2", 1000.0), temperature=1.0, epochs=20, batch_size=16,
            lr=1e-2, weight_decay=0.0, augment=False, generator=torch.Generator().manual_seed(0),
            device=torch.device("cpu"), student_step=lambda model, x, t: (model(x, features=True), t))
    assert distance() < before / 4
    with pytest.raises(ValueError, match="no image features"):
        CnnStudent(vectors, 20.0, head="linear", width=8, depth=1, backbone="cifar_resnet")(x, features=True)
