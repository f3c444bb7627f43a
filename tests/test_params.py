from pathlib import Path

import pytest
import yaml

from clipdistill.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.world.classes[0] == "circle"
    assert isinstance(p.synthesize.lr, float)


@pytest.mark.parametrize("section, key", [("distill", "epochs"), ("distill.kdpl", "topk"), ("", "seed"),
                                          ("student_clip", "vision_heads"), ("prompts.mix", "k")])
def test_a_key_left_out_is_refused_naming_it(section, key):
    # No dataclass default: params.yaml is the one place a default is written, and every key a
    # stage reads is in the file DVC tracks.
    r = raw()
    node = r
    for part in filter(None, section.split(".")):
        node = node[part]
    del node[key]
    full = f"{section}.{key}" if section else key
    with pytest.raises(ParamsError, match=f"missing params key '{full}'"):
        parse_params(r)


def test_allowed_values_come_from_the_registries():
    from clipdistill.losses import LOSSES
    from clipdistill.params import REGISTRIES, choices
    from clipdistill.prompts import METHODS
    from clipdistill.students import STUDENTS

    assert choices("distill.loss") == tuple(LOSSES) and choices("prompts.method") == tuple(METHODS)
    assert choices("distill.student") == tuple(STUDENTS) == ("cnn", "promptkd", "kdpl")
    r = raw()
    for key in REGISTRIES:  # a value no registry knows is refused, naming the registry's names
        node = r
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        saved, node[leaf] = node[leaf], "nonesuch"
        with pytest.raises(ParamsError, match=f"'{key}' is 'nonesuch'; choose one of {', '.join(choices(key))}"):
            parse_params(r)
        node[leaf] = saved


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r["distill"].update(temprature=2), "distill.temprature"),
    (lambda r: r.update(bogus=1), "'bogus'"),
    (lambda r: r["world"].update(classes=[]), "world.classes"),
    (lambda r: r["distill"].update(epochs="ten"), "distill.epochs"),
    (lambda r: r["distill"].update(epochs=2.5), "distill.epochs"),
    (lambda r: r["synthesize"].update(augment="yes"), "synthesize.augment"),
    (lambda r: r["world"].update(classes="circle"), "world.classes"),
    (lambda r: r["prompts"].update(method="fancy"), "prompts.method"),
    (lambda r: r["distill"].update(batch_size=0), "distill.batch_size"),
    (lambda r: r["text_features"].update(templates=["no slot"]), "text_features.templates[0]"),
    (lambda r: r["eval"].update(datasets=[{"name": "x"}]), "eval.datasets[0].path"),
    (lambda r: r["teacher"].update(source="open_clip", pretrained=""), "teacher.pretrained"),
    (lambda r: r["world"].update(source="folder"), "world.root"),
    (lambda r: r["world"].update(source="folder", root="data/PACS"), "teacher.source"),
    (lambda r: r.update(precision="fp16"), "precision"),
    (lambda r: r["distill"]["cnn"].update(backbone="vit"), "distill.cnn.backbone"),
    (lambda r: r["distill"].update(lr=-1), "distill.lr"),
    (lambda r: r["teacher"].update(weight_decay=-0.1), "teacher.weight_decay"),
    (lambda r: r["world"].update(classes=["circle", "tri/angle"]), "world.classes[1]"),
    (lambda r: r["world"].update(classes=["circle", " "]), "world.classes[1]"),
    (lambda r: r["world"].update(classes=["circle", "circle"]), "'circle' more than once"),
    (lambda r: r["world"].update(classes=["circle", "dog"]), "'dog'"),
    (lambda r: r["world"].update(image_size=30), "world.image_size"),  # ch_mult [1, 1, 2]: factor 4
    (lambda r: r["distill"].update(batch_size=701), "distill.batch_size"),  # 100 prompts x 7 classes
    (lambda r: r["distill"].update(batch_size=301), "distill.batch_size"),  # base-to-novel: 3 base classes
    (lambda r: r["world"].update(val_styles=["photo"]), "world.val_styles"),  # an evaluated domain
    (lambda r: r["world"].update(val_styles=["chalk", "silhouette"], train_styles=["photo", "painting", "cartoon",
                                                                                  "sketch", "chalk"]), "world.val_styles"),
    (lambda r: r["world"].update(val_styles=["neon", "neon"]), "world.val_styles"),
    (lambda r: r["world"].update(val_per_class_style=0), "world.val_per_class_style"),
    (lambda r: r["teacher"].update(batch_size=5000), "teacher.batch_size"),  # 8 styles x 80 x 7 = 4480
    (lambda r: r["teacher"].update(text_heads=3), "teacher.text_width"),
    (lambda r: r["generator"].update(ch=16), "generator.ch"),
    # taming's encoder widens only in res blocks: none per level and a widened middle level cannot build
    (lambda r: r["generator"].update(ch_mult=[1, 2, 2], num_res_blocks=0), "generator.ch_mult"),
])
def test_bad_params_fail_with_one_line_naming_the_key(mutate, needle):
    r = raw()
    mutate(r)
    with pytest.raises(ParamsError) as err:
        parse_params(r)
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg


def test_numbers_coerce_and_lists_are_typed():
    r = raw()
    r["distill"]["temperature"] = 2  # an int where a float is expected is fine
    r["eval"]["datasets"] = [{"name": "pacs", "path": "/data/pacs"}]
    p = parse_params(r)
    assert p.distill.temperature == 2.0 and isinstance(p.distill.temperature, float)
    assert p.eval.datasets[0].path == "/data/pacs"


def test_exponent_floats_load_as_numbers(tmp_path):
    """`dvc exp run -S distill.lr=1e-4` writes `lr: 1e-4`, which YAML 1.1 reads as a string."""
    r = raw()
    r["distill"]["lr"], r["distill"]["temperature"] = "__LR__", "__T__"
    text = yaml.safe_dump(r, sort_keys=False).replace("__LR__", "1e-4").replace("__T__", "2E+0")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    p = load_params(path)
    assert p.distill.lr == 1e-4 and p.distill.temperature == 2.0
    assert p.world.classes == raw()["world"]["classes"]


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("data, needle", [
    (b"", "is empty"),
    (b"- seed\n- world\n", "got a list"),
    (b"world: [circle\nseed: 0\n", "not valid YAML"),
    (b"seed: 0\nworld:\n  root: caf\xe9\n", "not utf-8 text"),
])
def test_a_params_file_that_is_no_mapping_fails_with_one_line(tmp_path, data, needle):
    path = tmp_path / "params.yaml"
    path.write_bytes(data)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_the_paper_preset_is_valid():
    p = load_params(ROOT / "presets" / "pacs_vitb32.yaml")
    assert (p.world.source, p.teacher.source, p.generator.source) == ("folder", "open_clip", "taming")
    assert p.world.image_size == 224 and p.distill.cnn.backbone == "resnet18"


@pytest.mark.parametrize("name", ["params.yaml", "presets/pacs_vitb32.yaml", "tests/tiny_params.yaml"])
def test_every_params_file_holds_every_key_dvc_tracks(name):
    """DVC refuses to run a stage whose tracked params key is absent from params.yaml, so every
    file users or tests copy to params.yaml must hold them all."""
    tracked = {k for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
               for k in stage.get("params", []) if isinstance(k, str)}
    params = yaml.safe_load((ROOT / name).read_text())

    def has(key):
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert tracked and sorted(k for k in tracked if not has(k)) == []
