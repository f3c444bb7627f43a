"""Exported classifiers (clipdistill/export.py): every student kind and the teacher's image tower as
ONNX and torch.export files whose logits match PyTorch's, with the card `predict` reads."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from project import tiny_clip

from clipdistill.clip_models import CosineClassifier
from clipdistill.export import MAX_ABS_DIFF, export_classifier, onnx_logits, parity
from clipdistill.preprocess import clip_default
from clipdistill.prompt_students import KDPLStudent, PromptKDStudent
from clipdistill.runtime import PipelineError
from clipdistill.students import CnnStudent

CLASSES = ["circle", "square", "star"]
SIZE = 16


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def vectors(dim=16):
    return F.normalize(torch.randn(len(CLASSES), dim, generator=gen(1)), dim=-1)


def images(n=24):
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=gen(2), dtype=torch.uint8)


def trained_like(model, forward=None):
    """Off its initial state, BatchNorm statistics included, then in eval mode."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    (forward or model)(images(8).float().div(255))
    return model.eval()


STUDENTS = {
    "cnn": lambda: CnnStudent(vectors(), 20.0, head="projection", width=4, depth=1, backbone="cifar_resnet"),
    "promptkd": lambda: PromptKDStudent(tiny_clip().eval(), vectors(), 20.0, n_prompts=2, prompt_depth=2,
                                        generator=gen()),
    "kdpl": lambda: KDPLStudent(tiny_clip().eval(), CLASSES, n_ctx=4, ctx_init="a photo of a", n_prompts=2,
                                prompt_depth=2, generator=gen()),
}


@pytest.mark.parametrize("kind", STUDENTS)
def test_every_student_kind_exports_with_matching_logits(tmp_path, kind):
    student = trained_like(STUDENTS[kind]())
    model = student.classifier()
    x = images()
    with torch.no_grad():  # folding KDPL's text features changes nothing
        assert torch.allclose(model(x.float().div(255)), student(x.float().div(255)), atol=1e-5)
    checks = export_classifier(model, tmp_path, "student", CLASSES, clip_default(SIZE), {"student": kind}, x, batch_size=10)
    for fmt in ("onnx", "torch_export"):
        assert checks[fmt]["max_abs_diff"] <= MAX_ABS_DIFF and checks[fmt]["argmax_agreement"] == 1.0
        assert checks[fmt]["images"] == len(x)
    card = json.loads((tmp_path / "student.json").read_text())
    assert card["classes"] == CLASSES and card["input"]["size"] == SIZE and card["made_by"] == {"student": kind}
    assert len(card["input"]["mean"]) == 3 and card["input"]["normalised_by_model"] is True
    # dynamic batch: a batch size never seen at export runs
    assert onnx_logits(tmp_path / "student.onnx", images(7), batch_size=7).shape == (7, len(CLASSES))


def test_the_teachers_image_tower_exports_as_its_zero_shot_classifier(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_clip()
    teacher = trained_like(teacher, teacher.encode_image).requires_grad_(False)
    v = vectors()
    x = images()
    classifier = CosineClassifier.zero_shot(teacher, v)
    with torch.no_grad():
        assert torch.allclose(classifier(x.float().div(255)), teacher.logits(x.float().div(255), v), atol=1e-5)
    checks = export_classifier(classifier, tmp_path, "teacher", CLASSES, clip_default(SIZE), {}, x, batch_size=24)
    assert checks["onnx"]["max_abs_diff"] <= MAX_ABS_DIFF
    assert not any(k.startswith(("transformer.", "token_embedding")) for k in classifier.state_dict())


def test_parity_refuses_a_file_that_disagrees():
    ref = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    assert parity(ref, ref + 5e-5, "x.onnx")["max_abs_diff"] == pytest.approx(5e-5, rel=1e-2)  # float32 sums
    with pytest.raises(PipelineError, match="x.onnx does not match PyTorch: max"):
        parity(ref, ref + 1e-3, "x.onnx")
