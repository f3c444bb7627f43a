"""Official taming-transformers releases through clipdistill.taming_release: the official layouts load without
pytorch-lightning, and a hostile .ckpt is refused in one line before any of its code could run."""
import collections
import os
import pickle
import shlex
import subprocess
import sys
import time
import types

import pytest
import torch
import yaml
from project import ROOT, run
from taming_official import (
    RELEASE_CONFIGS,
    ModelCheckpoint,
    block_lightning,
    lightning_checkpoint,
    official_model,
    release_config,
    save_lightning,
    write_release,
)

from clipdistill.taming_release import (
    UnsafeGlobalError,
    _Placeholder,
    _resolve_global,
    load_taming_checkpoint,
    read_lightning_checkpoint,
)
from clipdistill.vqgan import CheckpointError, VQGANConfig


# ------------------------------------------------------------------------------------ official layouts
# Full-size models in the official layout (see tests/taming_official.py). They are fully convolutional, so a
# 16x16 or 32x32 image (2x2 latents) keeps their forward passes cheap on CPU.

F16_RELEASES = ["vqgan_imagenet_f16_1024", "vqgan_imagenet_f16_16384"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """name -> (config_path, ckpt_path, reference model of taming modules holding the saved weights)."""
    written = {}

    def get(name):
        if name not in written:
            config = release_config(name)
            reference = official_model(config, seed=sorted(RELEASE_CONFIGS).index(name))
            paths = write_release(tmp_path_factory.mktemp("releases") / name, config, reference.state_dict())
            written[name] = (*paths, reference)
        return written[name]

    return get


def assert_weights_equal(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)  # so also: no loss.* key survived
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def tiny_release_config(target="taming.models.vqgan.VQModel"):
    config = release_config("vqgan_imagenet_f16_1024")
    config["model"]["target"] = target
    config["model"]["params"].update(embed_dim=32, n_embed=16, ddconfig={
        **config["model"]["params"]["ddconfig"], "z_channels": 32, "resolution": 16, "ch": 32, "ch_mult": [1, 1],
        "num_res_blocks": 1, "attn_resolutions": [],
    })
    return config


@pytest.mark.parametrize("name", F16_RELEASES)
def test_load_official_vq_release(name, release, monkeypatch):
    config_path, ckpt_path, reference = release(name)
    block_lightning(monkeypatch)  # loading must not need pytorch-lightning
    model = load_taming_checkpoint(config_path, ckpt_path)
    assert not model.training
    assert model.cfg == VQGANConfig(
        embed_dim=256, n_embed=RELEASE_CONFIGS[name]["model"]["params"]["n_embed"], z_channels=256, resolution=256,
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), quantizer="vq",
    )
    assert model.downsample_factor == 16
    assert_weights_equal(model, reference)
    torch.testing.assert_close(model.codebook, reference.quantize.embedding.weight, rtol=0, atol=0)


def test_official_vq_release_encodes_and_decodes(release, gen):
    # the two f16 releases differ only in codebook size, so one forward check covers both
    config_path, ckpt_path, reference = release("vqgan_imagenet_f16_1024")
    model = load_taming_checkpoint(config_path, ckpt_path)
    x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        z = model.encode_continuous(x)
        zq, _, idx = model.vector_quantize(z)  # together: model.encode(x)
        rec = model.decode(zq)
        # taming's VectorQuantizer and Decoder on the saved weights
        _, _, (_, _, want_idx) = reference.quantize(z)
        want_rec = reference.decoder(reference.post_quant_conv(zq))
    assert zq.shape == (1, 256, 2, 2) and idx.shape == (1, 2, 2)
    assert idx.flatten().tolist() == want_idx.flatten().tolist()
    torch.testing.assert_close(zq.permute(0, 2, 3, 1), model.codebook[idx], rtol=0, atol=0)
    assert rec.shape == (1, 3, 32, 32)
    torch.testing.assert_close(rec, want_rec)


def test_load_official_gumbel_release(release, monkeypatch, gen):
    config_path, ckpt_path, reference = release("vqgan_gumbel_f8")
    block_lightning(monkeypatch)
    model = load_taming_checkpoint(config_path, ckpt_path)
    assert model.cfg == VQGANConfig(
        embed_dim=256, n_embed=8192, z_channels=256, resolution=256, ch=128, ch_mult=(1, 1, 2, 4),
        num_res_blocks=2, attn_resolutions=(32,), quantizer="gumbel", kl_weight=1e-8,
    )
    assert model.downsample_factor == 8
    assert_weights_equal(model, reference)
    torch.testing.assert_close(model.codebook, reference.quantize.embed.weight, rtol=0, atol=0)

    # decoding codebook rows: decoder(post_quant_conv(embed[idx])), as GumbelVQ.decode does
    idx = torch.randint(0, 8192, (1, 2, 2), generator=gen)
    x = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    with torch.no_grad():
        rec = model.decode_indices(idx)
        want_rec = reference.decoder(reference.post_quant_conv(reference.quantize.embed(idx).permute(0, 3, 1, 2)))
        # encoding: encoder -> quant_conv -> proj logits -> top code -> its embed row
        z = model.encode_continuous(x)
        zq, _, codes = model.vector_quantize(z)
        want_codes = reference.quantize.proj(z).argmax(1)
    assert rec.shape == (1, 3, 16, 16)
    torch.testing.assert_close(rec, want_rec)
    assert z.shape == (1, 256, 2, 2) and codes.shape == (1, 2, 2)
    torch.testing.assert_close(codes, want_codes, rtol=0, atol=0)
    torch.testing.assert_close(zq, model.codebook[codes].permute(0, 3, 1, 2), rtol=0, atol=0)


def test_vector_quantizer2_config_keys_are_accepted(tmp_path):
    config = tiny_release_config()
    reference = official_model(config, seed=0)
    config["model"]["params"].update(remap=None, sane_index_shape=True, legacy=False)
    config_path, ckpt_path = write_release(tmp_path, config, reference.state_dict())
    model = load_taming_checkpoint(config_path, ckpt_path)
    assert model.cfg.quantizer == "vq"
    assert_weights_equal(model, reference)


def test_release_checkpoint_that_does_not_fit_its_config(release):
    config_path, _, _ = release("vqgan_imagenet_f16_1024")
    _, ckpt_path, _ = release("vqgan_imagenet_f16_16384")
    with pytest.raises(ValueError) as info:
        load_taming_checkpoint(config_path, ckpt_path)
    message = str(info.value)
    assert str(ckpt_path) in message and "\n" not in message
    assert "quantize.embedding.weight [16384, 256] in the file vs [1024, 256]" in message


def test_missing_release_files_say_what_to_download(tmp_path):
    root = tmp_path / "vqgan_imagenet_f16_16384"
    config_path, ckpt_path = root / "configs" / "model.yaml", root / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError) as info:
        load_taming_checkpoint(config_path, ckpt_path)
    message = str(info.value)
    assert str(config_path) in message and "model.yaml" in message and "exactly this path" in message
    assert "release vqgan_imagenet_f16_16384 (README row 'VQGAN ImageNet (f=16), 16384')" in message

    config_path.parent.mkdir(parents=True)
    config_path.write_text(yaml.safe_dump(RELEASE_CONFIGS["vqgan_imagenet_f16_16384"]))
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*last\.ckpt does not exist: download last\.ckpt of "
                                                r"the official taming-transformers release vqgan_imagenet_f16_16384"):
        load_taming_checkpoint(config_path, ckpt_path)
    # the Gumbel release as it is often saved, and a name that says nothing
    with pytest.raises(FileNotFoundError, match="release vqgan_gumbel_f8 "):
        load_taming_checkpoint(config_path, tmp_path / "vqgan_gumbel_f8_8192.ckpt")
    with pytest.raises(FileNotFoundError, match="one of vqgan_imagenet_f16_1024, vqgan_imagenet_f16_16384, vqgan_gumb"):
        load_taming_checkpoint(config_path, tmp_path / "model.ckpt")


def test_corrupt_release_checkpoint(tmp_path, gen):
    config_path, ckpt_path = write_release(tmp_path, tiny_release_config(), {})
    ckpt_path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist()))
    with pytest.raises(ValueError) as info:
        load_taming_checkpoint(config_path, ckpt_path)
    message = str(info.value)
    assert str(ckpt_path) in message and "unreadable or corrupt" in message and "\n" not in message
    torch.save({"epoch": 1, "global_step": 10}, ckpt_path)
    with pytest.raises(ValueError, match=r"last\.ckpt holds no state_dict"):
        load_taming_checkpoint(config_path, ckpt_path)


def test_release_config_and_checkpoint_of_different_quantizers(tmp_path):
    vq_config = tiny_release_config()
    _, ckpt_path = write_release(tmp_path / "vq", vq_config, official_model(vq_config, seed=0).state_dict())
    gumbel_config = tiny_release_config("taming.models.vqgan.GumbelVQ")
    gumbel_path, _ = write_release(tmp_path / "gumbel", gumbel_config, {})
    with pytest.raises(ValueError) as info:
        load_taming_checkpoint(gumbel_path, ckpt_path)
    message = str(info.value)
    assert str(ckpt_path) in message and "\n" not in message
    assert "missing keys quantize.embed.weight, quantize.proj.bias" in message
    assert "unexpected keys quantize.embedding.weight" in message


def test_release_config_errors(tmp_path):
    ckpt_path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt_path)
    config_path = tmp_path / "model.yaml"

    config_path.write_text("model: {params: {}}\n")
    with pytest.raises(ValueError, match=r"model\.yaml is not in the official layout"):
        load_taming_checkpoint(config_path, ckpt_path)
    for target in ("taming.models.vqgan.EMAVQ", "taming.models.cond_transformer.Net2NetTransformer"):
        config_path.write_text(yaml.safe_dump(tiny_release_config(target)))
        with pytest.raises(CheckpointError, match=f"model.target {target} is not supported"):
            load_taming_checkpoint(config_path, ckpt_path)
    config = tiny_release_config()
    config["model"]["params"]["remap"] = "data/used_codes.npy"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="remap"):
        load_taming_checkpoint(config_path, ckpt_path)
    config = tiny_release_config("taming.models.vqgan.GumbelVQ")
    config["model"]["params"]["embed_dim"] = 64
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"model\.yaml: unusable architecture: .*embed_dim == z_channels"):
        load_taming_checkpoint(config_path, ckpt_path)


def test_release_callback_state_reads_as_inert_placeholders(tmp_path, monkeypatch):
    config = tiny_release_config()
    _, ckpt_path = write_release(tmp_path, config, official_model(config, seed=0).state_dict())
    block_lightning(monkeypatch)
    safe_before = set(torch.serialization.get_safe_globals())
    ckpt = read_lightning_checkpoint(ckpt_path)
    assert isinstance(ckpt["state_dict"], collections.OrderedDict)
    (key, state), = ckpt["callbacks"].items()
    # the class key is a placeholder under Lightning's name; pytorch_lightning was never imported
    assert issubclass(key, _Placeholder) and key is not ModelCheckpoint
    assert f"{key.__module__}.{key.__qualname__}" == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert sys.modules["pytorch_lightning"] is None
    assert torch.equal(state["best_model_score"], torch.tensor(0.25)) and state["best_model_path"] == "last.ckpt"
    # the numpy scalar comes back as an empty placeholder, not a numpy object
    assert isinstance(state["current_score"], _Placeholder) and state["current_score"] == {}
    assert ckpt["optimizer_states"][0]["param_groups"][0]["betas"] == (0.5, 0.9)
    assert set(torch.serialization.get_safe_globals()) == safe_before  # nothing stays allowlisted after the load


# ------------------------------------------------------------------------------------ hostile checkpoints
# Each payload unpickles as callable(*args) and, were it called, would create `marker`.

HOSTILE = ["os.system", "posix.system", "builtins.eval", "subprocess.Popen"]
# how the refusal names each: protocol 2 (torch.save's) writes subprocess under its Python 2 name, commands
SHOWN = {"subprocess.Popen": "commands.Popen (that is subprocess.Popen)"}


class Payload:
    """Pickles as ``target(*args)``: what a hostile checkpoint makes a plain unpickler call."""

    def __init__(self, target, *args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


def payload(name, marker):
    """A payload that creates `marker`, and the GLOBAL name its callable must be written under (or None)."""
    if name in ("os.system", "posix.system"):
        # os.system pickles as posix.system by itself; a hand-made file can name it os.system
        return Payload(os.system, f"touch {shlex.quote(str(marker))}"), (name if name == "os.system" else None)
    if name == "builtins.eval":
        return Payload(eval, f"open({str(marker)!r}, 'w').close()"), None
    return Payload(subprocess.Popen, ["touch", str(marker)]), None


class RenamingPickler(pickle._Pickler):
    """The pure-Python pickler, writing the objects in ``renames`` (id -> "module.name") under names we choose."""

    renames: dict[int, str] = {}
    # the base class saves Python functions through its own save_global; route them through ours
    dispatch = {**pickle._Pickler.dispatch, types.FunctionType: lambda self, obj: self.save_global(obj)}

    def save_global(self, obj, name=None):
        if id(obj) not in self.renames:
            return super().save_global(obj, name)
        module, name = self.renames[id(obj)].rsplit(".", 1)
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def save_hostile(obj, path, renames=(), **save_kwargs):
    """torch.save ``obj`` as a Lightning checkpoint, writing each (object, "module.name") of renames under that name."""
    pickler = type("Pickler", (RenamingPickler,), {"renames": {id(o): n for o, n in renames}})
    dump = lambda obj, fh, protocol: pickler(fh, protocol).dump(obj)  # noqa: E731 (the pre-zip format's header)
    module = types.SimpleNamespace(__name__="renaming_pickle", Pickler=pickler, dump=dump)
    save_lightning(obj, path, pickle_module=module, **save_kwargs)


def hostile_release(tmp_path, name, where="callback state", **save_kwargs):
    """(config, ckpt, marker): a valid tiny release with the payload in its callback state or as the whole file."""
    config = tiny_release_config()
    config_path, ckpt_path = write_release(tmp_path / "release", config, {})  # its checkpoint is replaced below
    marker = tmp_path / "pwned"
    evil, rename = payload(name, marker)
    ckpt = lightning_checkpoint(official_model(config, seed=0).state_dict())
    ckpt["callbacks"][ModelCheckpoint]["on_load"] = evil
    renames = [(evil.target, rename)] if rename else []
    save_hostile(evil if where == "top level" else ckpt, ckpt_path, renames, **save_kwargs)
    return config_path, ckpt_path, marker


def assert_not_run(marker, name):
    if name == "subprocess.Popen":
        time.sleep(0.3)  # a started process would create the marker a moment later
    assert not marker.exists(), f"the {name} payload ran"


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_payloads_run_under_a_plain_unpickler(name, tmp_path):
    # the control: these files really are hostile, so the refusals below mean something
    _, ckpt_path, marker = hostile_release(tmp_path, name, where="top level")
    obj = torch.load(ckpt_path, weights_only=False)
    if isinstance(obj, subprocess.Popen):
        obj.wait()
    assert marker.exists()


@pytest.mark.parametrize("where", ["callback state", "top level"])
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_global_is_refused_before_it_runs(name, where, tmp_path):
    config_path, ckpt_path, marker = hostile_release(tmp_path, name, where)
    safe_before = set(torch.serialization.get_safe_globals())
    with pytest.raises(CheckpointError) as info:
        load_taming_checkpoint(config_path, ckpt_path)
    assert isinstance(info.value, UnsafeGlobalError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message
    shown = SHOWN.get(name, name)
    assert message.startswith(f"taming checkpoint {ckpt_path} refers to {shown}, which a weights file never needs")
    assert_not_run(marker, name)
    assert set(torch.serialization.get_safe_globals()) == safe_before


def test_hostile_global_in_a_pre_zip_checkpoint_is_refused(tmp_path):
    # torch.save's format before 1.6: consecutive pickles instead of a zip
    config_path, ckpt_path, marker = hostile_release(tmp_path, "os.system", _use_new_zipfile_serialization=False)
    assert ckpt_path.read_bytes()[:2] != b"PK"
    with pytest.raises(UnsafeGlobalError, match=r"last\.ckpt refers to os\.system, "):
        load_taming_checkpoint(config_path, ckpt_path)
    assert_not_run(marker, "os.system")


def test_pre_zip_release_still_loads(tmp_path, monkeypatch):
    config = tiny_release_config()
    reference = official_model(config, seed=0)
    config_path, ckpt_path = write_release(tmp_path, config, {})
    save_lightning(lightning_checkpoint(reference.state_dict()), ckpt_path, _use_new_zipfile_serialization=False)
    block_lightning(monkeypatch)
    assert_weights_equal(load_taming_checkpoint(config_path, ckpt_path), reference)


def test_pickle_opcodes_torch_does_not_parse_are_refused(tmp_path):
    # protocol 4 names globals with STACK_GLOBAL, which torch's weights-only unpickler does not implement
    config_path, ckpt_path, marker = hostile_release(tmp_path, "posix.system", pickle_protocol=4)
    with pytest.raises(CheckpointError) as info:
        load_taming_checkpoint(config_path, ckpt_path)
    assert "unreadable or corrupt" in str(info.value) and "\n" not in str(info.value)
    assert_not_run(marker, "posix.system")


def stand_in(*args, **kwargs):
    raise AssertionError("a pickled global was resolved to a real object")


@pytest.mark.parametrize("global_name", [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",  # a real Lightning class, called with a command
    "pytorch_lightning.os.system",  # os reached through a Lightning module's attributes
    "lightning.pytorch.callbacks.subprocess.Popen",
    "lightning_fabric.utilities.cloud_io._load",
])
def test_lightning_named_globals_are_inert_placeholders(global_name, tmp_path, monkeypatch):
    config = tiny_release_config()
    reference = official_model(config, seed=0)
    config_path, ckpt_path = write_release(tmp_path, config, {})
    marker = tmp_path / "pwned"
    ckpt = lightning_checkpoint(reference.state_dict())
    ckpt["callbacks"][ModelCheckpoint]["on_load"] = Payload(stand_in, f"touch {marker}")
    save_hostile(ckpt, ckpt_path, [(stand_in, global_name)])
    block_lightning(monkeypatch)
    assert_weights_equal(load_taming_checkpoint(config_path, ckpt_path), reference)
    called = next(iter(read_lightning_checkpoint(ckpt_path)["callbacks"].values()))["on_load"]
    assert isinstance(called, _Placeholder) and called == {}  # "called" with the command: an empty object
    assert f"{type(called).__module__}.{type(called).__qualname__}" == global_name
    assert not marker.exists()


def test_system_call_inside_a_lightning_object_is_still_refused(tmp_path):
    class Hook:
        pass

    marker = tmp_path / "pwned"
    hook = Hook()
    hook.command = Payload(os.system, f"touch {marker}")  # the Lightning object itself is a placeholder, its state not
    config = tiny_release_config()
    config_path, ckpt_path = write_release(tmp_path, config, {})
    ckpt = lightning_checkpoint(official_model(config, seed=0).state_dict())
    ckpt["callbacks"][ModelCheckpoint]["hook"] = hook
    save_hostile(ckpt, ckpt_path, [(Hook, "pytorch_lightning.callbacks.Hook")])
    with pytest.raises(UnsafeGlobalError, match=r"refers to posix\.system, "):
        load_taming_checkpoint(config_path, ckpt_path)
    assert not marker.exists()


@pytest.mark.parametrize("name, expected", [
    ("collections.defaultdict", collections.defaultdict),
    ("builtins.frozenset", frozenset),
    ("builtins.slice", slice),
    ("numpy.core.multiarray.scalar", _Placeholder),
    ("numpy._core.multiarray._reconstruct", _Placeholder),
    ("numpy.dtype", _Placeholder),
    ("numpy.dtypes.Float64DType", _Placeholder),
    ("lightning_fabric.wrappers._FabricModule", _Placeholder),
])
def test_allowlist_admits(name, expected, tmp_path):
    got = _resolve_global(tmp_path / "x.ckpt", name)
    if expected is _Placeholder:
        assert isinstance(got, type) and issubclass(got, _Placeholder)
        module = name.rpartition(".")[0]
        assert got.__module__ == module and (module not in sys.modules or module.startswith("numpy"))
        obj = got("rm -rf /", shell=True)
        obj.__setstate__({"__class__": dict, "command": "rm -rf /"})
        assert obj == {} and type(obj) is got and not vars(obj)
    else:
        assert got is expected


@pytest.mark.parametrize("name", [
    "os.system", "posix.system", "nt.system", "builtins.eval", "builtins.exec", "builtins.getattr",
    "builtins.__import__", "builtins.open", "subprocess.Popen", "importlib.import_module", "functools.partial",
    "operator.attrgetter", "torch.load", "torch.hub.load", "torch.jit.load", "numpy.load", "numpy.frombuffer",
    "pytorch_lightning_evil.run", "omegaconf.OmegaConf.create", "taming.main.instantiate_from_config",
])
def test_allowlist_refuses(name, tmp_path):
    with pytest.raises(UnsafeGlobalError) as info:
        _resolve_global(tmp_path / "x.ckpt", name)
    assert f"refers to {name}, which a weights file never needs; refusing to load it" in str(info.value)


def test_stage_refuses_a_hostile_release_in_one_line(tmp_path):
    config_path, ckpt_path, marker = hostile_release(tmp_path, "os.system")
    params = yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text())
    params["generator"].update(source="taming", taming_config=str(config_path), taming_checkpoint=str(ckpt_path))
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    world, out = tmp_path / "world", tmp_path / "generator"
    # a real (tiny) world, so that the checkpoint is the only thing wrong whatever order the stage reads in
    run([sys.executable, "stages/world.py", "--params", str(params_path), "--out", str(world)], ROOT)
    proc = run([sys.executable, "stages/generator.py", "--params", str(params_path), "--world", str(world),
                "--out", str(out)], ROOT, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: taming checkpoint {ckpt_path} refers to os.system, "), lines[0]
    assert not marker.exists()
    # and no output folder, no temporary or work folder next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "release", "world"]
