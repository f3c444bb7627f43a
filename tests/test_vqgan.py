import pytest
import torch
import yaml

from clipdistill.vqgan import (
    VQGAN,
    VQGANConfig,
    _restart_dead_codes,
    load_checkpoint,
    load_taming_checkpoint,
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


def test_state_dict_keys_follow_taming_layout():
    keys = set(tiny_model().state_dict())
    assert "quantize.embedding.weight" in keys
    for prefix in ("encoder.conv_in.", "decoder.conv_out.", "quant_conv.", "post_quant_conv."):
        assert any(k.startswith(prefix) for k in keys), prefix


def test_config_rejects_channels_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="multiples of 32"):
        VQGAN(tiny_cfg(ch=16))


def test_training_lowers_loss_and_raises_psnr():
    imgs = coloured_squares()
    model = tiny_model()
    before = reconstruction_psnr(model, imgs)
    losses = train_vqgan(model, imgs, steps=40, batch_size=16, lr=2e-3, seed=0, progress=False)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert reconstruction_psnr(model, imgs) > before + 3.0
    assert reconstruction_psnr(model, imgs.float() / 255) == pytest.approx(reconstruction_psnr(model, imgs))


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


def test_checkpoint_round_trip(tmp_path, gen):
    cfg = tiny_cfg(ch_mult=(1, 1, 1))
    model = tiny_model(cfg).eval()
    path = tmp_path / "sub" / "vqgan.pt"
    save_checkpoint(model, cfg, path)
    assert [p.name for p in path.parent.iterdir()] == ["vqgan.pt"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded.cfg == cfg
    z = torch.randn(2, cfg.embed_dim, 4, 4, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)


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


def _official_layout(cfg, target="taming.models.vqgan.VQModel"):
    return {"model": {
        "base_learning_rate": 4.5e-6,
        "target": target,
        "params": {
            "embed_dim": cfg.embed_dim,
            "n_embed": cfg.n_embed,
            "ddconfig": {
                "double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.resolution,
                "in_channels": 3, "out_ch": 3, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult),
                "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": [8], "dropout": 0.0,
            },
            "lossconfig": {
                "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000,
                           "disc_weight": 0.8, "codebook_weight": 1.0},
            },
        },
    }}


def test_load_taming_checkpoint(tmp_path):
    cfg = tiny_cfg(ch_mult=(1, 1, 1), attn_resolutions=(8,))
    ref = tiny_model(cfg, seed=3)
    config_path, ckpt_path = tmp_path / "model.yaml", tmp_path / "last.ckpt"
    config_path.write_text(yaml.safe_dump(_official_layout(cfg)))
    state = dict(ref.state_dict())
    state["loss.discriminator.x"] = torch.ones(2)
    state["loss.perceptual_loss.y"] = torch.ones(1)
    torch.save({"state_dict": state, "global_step": 1}, ckpt_path)

    loaded = load_taming_checkpoint(config_path, ckpt_path)
    assert loaded.cfg == cfg
    got = loaded.state_dict()
    assert not any(k.startswith("loss.") for k in got)
    assert set(got) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_load_taming_checkpoint_errors(tmp_path):
    cfg = tiny_cfg()
    config_path, ckpt_path = tmp_path / "model.yaml", tmp_path / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="model.yaml"):
        load_taming_checkpoint(config_path, ckpt_path)
    config_path.write_text(yaml.safe_dump(_official_layout(cfg)))
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        load_taming_checkpoint(config_path, ckpt_path)

    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, ckpt_path)
    with pytest.raises(ValueError, match="last.ckpt"):
        load_taming_checkpoint(config_path, ckpt_path)

    gumbel = tmp_path / "gumbel.yaml"
    layout = _official_layout(cfg, target="taming.models.vqgan.GumbelVQ")
    layout["model"]["params"]["quantizer"] = {"target": "taming.modules.vqvae.quantize.GumbelQuantize"}
    gumbel.write_text(yaml.safe_dump(layout))
    with pytest.raises(NotImplementedError, match="Gumbel"):
        load_taming_checkpoint(gumbel, ckpt_path)

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {params: {}}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_taming_checkpoint(bad, ckpt_path)
