import pytest
import torch

from clipdistill.vqgan import (
    VQGAN,
    VQGANConfig,
    _restart_dead_codes,
    load_checkpoint,
    reconstruction_psnr,
    save_checkpoint,
    train_vqgan,
)


def tiny_cfg(ch_mult=(1, 1), resolution=16, **kw):
    base = dict(embed_dim=8, n_embed=32, z_channels=8, resolution=resolution, ch=32, ch_mult=ch_mult,
                num_res_blocks=1)
    base.update(kw)
    return VQGANConfig(**base)


def tiny_model(cfg=None, seed=0):
    torch.manual_seed(seed)
    return VQGAN(cfg or tiny_cfg())


def coloured_squares(n=64, size=16, seed=0):
    """uint8 [n, 3, size, size]: one random-coloured square on a random-coloured background each."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.randint(0, 256, (n, 3, 1, 1), generator=g, dtype=torch.uint8)
    fg = torch.randint(0, 256, (n, 3, 1, 1), generator=g, dtype=torch.uint8)
    imgs = bg.expand(n, 3, size, size).clone()
    for i in range(n):
        s = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=g))
        y, x = torch.randint(0, size - s + 1, (2,), generator=g).tolist()
        imgs[i, :, y:y + s, x:x + s] = fg[i]
    return imgs


@pytest.mark.parametrize("ch_mult,f", [((1, 1), 2), ((1, 1, 1), 4)])
def test_encode_decode_shapes_and_codebook_rows(ch_mult, f, gen):
    cfg = tiny_cfg(ch_mult=ch_mult)
    model = tiny_model(cfg).eval()
    assert model.downsample_factor == f
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    with torch.no_grad():
        zq, qloss, idx = model.encode(x)
        rec = model.decode(zq)
        rec2, qloss2 = model(x)
    assert zq.shape == (2, cfg.embed_dim, 16 // f, 16 // f)
    assert idx.shape == (2, 16 // f, 16 // f) and idx.dtype == torch.int64
    assert qloss.ndim == 0 and qloss.item() >= 0
    assert rec.shape == x.shape
    torch.testing.assert_close(rec2, rec)
    assert model.codebook.shape == (cfg.n_embed, cfg.embed_dim)
    # every latent vector is exactly the codebook row its index names
    torch.testing.assert_close(zq.permute(0, 2, 3, 1), model.codebook[idx], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_indices(idx), rec, rtol=0, atol=0)


@pytest.mark.parametrize("quantizer,quantize_keys", [
    ("vq", {"quantize.embedding.weight"}),
    ("gumbel", {"quantize.proj.weight", "quantize.proj.bias", "quantize.embed.weight"}),
])
def test_state_dict_keys_follow_taming_layout(quantizer, quantize_keys):
    model = tiny_model(tiny_cfg(quantizer=quantizer))
    keys = set(model.state_dict())
    assert {k for k in keys if k.startswith("quantize.")} == quantize_keys
    for prefix in ("encoder.conv_in.", "decoder.conv_out.", "quant_conv.", "post_quant_conv."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert model.codebook.shape == (32, 8)


def test_gumbel_quantizer_takes_the_top_logit_code(gen):
    model = tiny_model(tiny_cfg(quantizer="gumbel")).eval()
    z = torch.randn(2, 8, 3, 3, generator=gen)
    with torch.no_grad():
        zq, kl, idx = model.vector_quantize(z)
        logits = torch.nn.functional.conv2d(z, model.quantize.proj.weight, model.quantize.proj.bias)
    torch.testing.assert_close(idx, logits.argmax(1), rtol=0, atol=0)
    torch.testing.assert_close(zq.permute(0, 2, 3, 1), model.codebook[idx], rtol=0, atol=0)
    q = logits.softmax(1)
    torch.testing.assert_close(kl, 1e-8 * (q * torch.log(q * 32 + 1e-10)).sum(1).mean())
    # with a gradient, the backward pass reaches z through the softmax relaxation
    z.requires_grad_(True)
    model.vector_quantize(z)[0].sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_vector_quantizer_matches_taming(gen):
    from taming.modules.vqvae.quantize import VectorQuantizer

    model = tiny_model().eval()
    theirs = VectorQuantizer(32, 8, beta=0.25)
    theirs.embedding.weight.data.copy_(torch.randn(32, 8, generator=gen))
    model.quantize.embedding.weight.data.copy_(theirs.embedding.weight)
    z = torch.randn(2, 8, 3, 3, generator=gen)
    with torch.no_grad():
        zq, _, idx = model.vector_quantize(z)
        want_zq, _, (_, _, want_idx) = theirs(z)
    assert idx.flatten().tolist() == want_idx.flatten().tolist()
    torch.testing.assert_close(zq, want_zq)


def test_gumbel_config_needs_embed_dim_equal_to_z_channels():
    with pytest.raises(ValueError, match="embed_dim == z_channels"):
        VQGAN(tiny_cfg(quantizer="gumbel", z_channels=16))
    with pytest.raises(ValueError, match="quantizer"):
        VQGAN(tiny_cfg(quantizer="fsq"))


def test_config_rejects_channels_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="multiples of 32"):
        VQGAN(tiny_cfg(ch=16))


def test_config_without_res_blocks_widens_only_the_last_level():
    # taming's encoder widens only in its res blocks: (1, 2, 2) with none cannot build a forward pass
    with pytest.raises(ValueError, match="num_res_blocks=0"):
        VQGAN(tiny_cfg(ch_mult=(1, 2, 2), num_res_blocks=0))
    model = VQGAN(tiny_cfg(ch_mult=(1, 1, 2), num_res_blocks=0))  # the last entry may widen
    assert model(torch.zeros(2, 3, 16, 16))[0].shape == (2, 3, 16, 16)


def test_training_lowers_loss_and_raises_psnr():
    imgs = coloured_squares()
    model = tiny_model()
    before = reconstruction_psnr(model, imgs)
    losses = train_vqgan(model, imgs, steps=40, batch_size=16, lr=2e-3, seed=0, progress=False)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert reconstruction_psnr(model, imgs) > before + 3.0
    assert reconstruction_psnr(model, imgs.float() / 255) == pytest.approx(reconstruction_psnr(model, imgs))


def test_cosine_schedule_warms_up_then_decays_to_zero_and_constant_keeps_the_rate(monkeypatch):
    from clipdistill import vqgan
    from clipdistill.params import GeneratorParams
    rates = []
    real_step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", record)
    train_vqgan(tiny_model(), coloured_squares(8), steps=100, batch_size=4, lr=1e-3, seed=0, progress=False,
                schedule="cosine")
    assert rates[0] == pytest.approx(0.5e-3) and rates[1] == pytest.approx(1e-3)  # 2 steps of warm-up
    assert max(rates) == pytest.approx(1e-3) and rates[-1] < 1e-5
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))  # then only down
    section = GeneratorParams(**{f: None for f in GeneratorParams.__dataclass_fields__} |
                              {"schedule": "cosine", "steps": 100, "lr": 1e-3})
    assert vqgan.generator_lrs(section) == pytest.approx(rates)  # what the stage writes to live/
    rates.clear()
    train_vqgan(tiny_model(), coloured_squares(8), steps=5, batch_size=4, lr=1e-3, seed=0, progress=False)
    assert rates == [1e-3] * 5
    with pytest.raises(ValueError, match="schedule"):
        train_vqgan(tiny_model(), coloured_squares(8), steps=1, batch_size=4, lr=1e-3, seed=0, schedule="linear")


def test_bf16_autocast_training_keeps_fp32_weights_and_still_learns():
    imgs = coloured_squares()
    model = tiny_model()
    before = reconstruction_psnr(model, imgs)
    train_vqgan(model, imgs, steps=40, batch_size=16, lr=2e-3, seed=0, progress=False, amp_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert reconstruction_psnr(model, imgs) > before + 3.0


def test_training_rejects_gumbel_models():
    with pytest.raises(ValueError, match="gumbel"):
        train_vqgan(tiny_model(tiny_cfg(quantizer="gumbel")), coloured_squares(4), steps=1, batch_size=2, lr=1e-3,
                    seed=0, progress=False)


def test_training_is_reproducible_from_seed():
    imgs = coloured_squares(16)
    states = []
    for seed in (0, 0, 1):
        model = tiny_model()
        train_vqgan(model, imgs, steps=3, batch_size=8, lr=1e-3, seed=seed, progress=False)
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_training_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    model = tiny_model()
    torch.manual_seed(123)
    train_vqgan(model, coloured_squares(8), steps=2, batch_size=4, lr=1e-3, seed=0, progress=False)
    torch.testing.assert_close(torch.rand(3), expected)


def test_dead_code_restart_reseeds_only_unused_codes(gen):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters())
    before = model.codebook.detach().clone()
    usage = torch.zeros(32, dtype=torch.long)
    usage[:20] = 5
    z = torch.randn(2, 8, 4, 4, generator=gen)
    assert _restart_dead_codes(model.quantize, opt, usage, z, gen) == 12
    after = model.codebook.detach()
    torch.testing.assert_close(after[:20], before[:20], rtol=0, atol=0)
    candidates = z.permute(0, 2, 3, 1).reshape(-1, 8)
    for row in after[20:]:
        assert (candidates == row).all(1).any()


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_checkpoint_round_trip(quantizer, tmp_path, gen):
    cfg = tiny_cfg(ch_mult=(1, 1, 1), quantizer=quantizer)
    model = tiny_model(cfg).eval()
    path = tmp_path / "sub" / "vqgan.pt"
    save_checkpoint(model, cfg, path)
    assert [p.name for p in path.parent.iterdir()] == ["vqgan.pt"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded.cfg == cfg
    z = torch.randn(2, cfg.embed_dim, 4, 4, generator=gen)
    x = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode(x)[2], model.encode(x)[2], rtol=0, atol=0)
    torch.testing.assert_close(loaded.codebook, model.codebook, rtol=0, atol=0)


def test_load_checkpoint_errors_name_the_path(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    missing = tmp_path / "missing.pt"
    with pytest.raises(ValueError, match="missing.pt"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(missing)
    no_config = tmp_path / "no_config.pt"
    torch.save({"state_dict": {}}, no_config)
    with pytest.raises(ValueError, match="no_config.pt"):
        load_checkpoint(no_config)
    wrong_keys = tmp_path / "wrong_keys.pt"
    from dataclasses import asdict
    torch.save({"state_dict": {"foo": torch.zeros(1)}, "config": asdict(tiny_cfg())}, wrong_keys)
    with pytest.raises(ValueError, match="wrong_keys.pt"):
        load_checkpoint(wrong_keys)


def test_taming_blocks_run_the_fused_swish():
    """Importing clipdistill.vqgan points taming's swish at F.silu: the same function, one kernel."""
    import taming.modules.diffusionmodules.model as taming_model

    assert taming_model.nonlinearity is torch.nn.functional.silu
    x = torch.randn(1000) * 6
    torch.testing.assert_close(taming_model.nonlinearity(x), x * torch.sigmoid(x))
