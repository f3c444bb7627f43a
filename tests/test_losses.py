import math

import pytest
import torch

from clipdistill.losses import get_loss, kd_kl, reverse_kl, symmetric_kl


def hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kd_kl_matches_hand_formula_with_temperature():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    T = 2.0
    p_t = torch.softmax(t / T, -1)[0].tolist()
    p_s = torch.softmax(s / T, -1)[0].tolist()
    assert kd_kl(s, t, T).item() == pytest.approx(T * T * hand_kl(p_t, p_s), rel=1e-5)
    assert reverse_kl(s, t, T).item() == pytest.approx(T * T * hand_kl(p_s, p_t), rel=1e-5)


def test_symmetric_kl_properties(gen):
    a = torch.randn(8, 5, generator=gen)
    b = torch.randn(8, 5, generator=gen)
    ab, ba = symmetric_kl(a, b), symmetric_kl(b, a)
    assert ab.item() > 0
    assert ab.item() == pytest.approx(ba.item(), rel=1e-5)
    assert symmetric_kl(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    hand = 0.5 * (pb * (pb.log() - pa.log())).sum(-1).mean() + 0.5 * (pa * (pa.log() - pb.log())).sum(-1).mean()
    assert ab.item() == pytest.approx(hand.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "symmetric_kl"])
def test_no_gradient_reaches_the_teacher(name, gen):
    s = torch.randn(4, 3, generator=gen, requires_grad=True)
    t = torch.randn(4, 3, generator=gen, requires_grad=True)
    get_loss(name, 1000.0)(s, t, 2.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_unknown_loss_is_refused_at_params_with_the_registrys_names():
    import yaml

    from clipdistill.losses import LOSSES
    from clipdistill.params import ParamsError, parse_params
    from project import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"]["loss"] = "l2"
    with pytest.raises(ParamsError, match="'distill.loss' is 'l2'; choose one of " + ", ".join(LOSSES)):
        parse_params(raw)


def _outputs(gen, requires_grad=False, n=4, c=3, d=5):
    from clipdistill.losses import Outputs

    logits = torch.randn(n, c, generator=gen).requires_grad_(requires_grad)
    features = torch.randn(n, d, generator=gen).requires_grad_(requires_grad)
    return Outputs(logits, features)


def test_feature_losses_match_the_hand_formulas(gen):
    s, t = _outputs(gen), _outputs(gen)
    t = t._replace(features=torch.nn.functional.normalize(t.features, dim=-1))  # the teacher's feature is unit-norm
    l2 = sum(sum((a - b) ** 2 for a, b in zip(sr, tr)) for sr, tr in zip(s.features.tolist(), t.features.tolist())) / 4
    assert get_loss("feature_l2", 1000.0)(s, t, 4.0).item() == pytest.approx(l2, rel=1e-5)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    hand = sum(1 - cos(a, b) for a, b in zip(s.features.tolist(), t.features.tolist())) / 4
    assert get_loss("feature_cosine", 1000.0)(s, t, 4.0).item() == pytest.approx(hand, rel=1e-5)
    # the KL weight adds weight * the logit KD loss
    combined = get_loss("feature_cosine", 1000.0, kl_weight=0.5)(s, t, 4.0).item()
    assert combined == pytest.approx(hand + 0.5 * kd_kl(s.logits, t.logits, 4.0).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["feature_l2", "feature_cosine"])
def test_feature_losses_send_no_gradient_to_the_teacher_and_are_zero_iff_equal(name, gen):
    s, t = _outputs(gen, requires_grad=True), _outputs(gen, requires_grad=True)
    t_unit = t._replace(features=torch.nn.functional.normalize(t.features, dim=-1))
    loss = get_loss(name, 1000.0, kl_weight=1.0)(s, t_unit, 2.0)
    loss.backward()
    assert t.logits.grad is None and t.features.grad is None
    assert s.features.grad.abs().sum() > 0 and s.logits.grad.abs().sum() > 0
    same = get_loss(name, 1000.0, kl_weight=1.0)(t_unit, t_unit, 2.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6) and loss.item() > 1e-3
    if name == "feature_cosine":  # the direction only: a rescaled student feature is still a perfect match
        scaled = t_unit._replace(features=3 * t_unit.features)
        assert get_loss(name, 1000.0)(scaled, t_unit, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    else:  # L2 also pins the norm
        scaled = t_unit._replace(features=3 * t_unit.features)
        assert get_loss(name, 1000.0)(scaled, t_unit, 2.0).item() == pytest.approx(4.0, rel=1e-5)


def test_a_feature_loss_needs_a_student_with_image_features():
    import yaml

    from clipdistill.params import ParamsError, parse_params
    from project import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"]["loss"] = "feature_l2"
    raw["distill"]["student"], raw["distill"]["cnn"]["head"] = "cnn", "projection"
    parse_params(raw)  # a CNN student with the projection head has image features
    for student, head in (("kdpl", "projection"), ("cnn", "linear")):
        raw["distill"]["student"], raw["distill"]["cnn"]["head"] = student, head
        raw["distill"]["base_to_novel"] = False
        with pytest.raises(ParamsError, match="'distill.loss' feature_l2 needs a student with image features"):
            parse_params(raw)
