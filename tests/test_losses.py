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
