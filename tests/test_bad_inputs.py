"""Bad inputs through the real stage commands: every row is one user mistake (a params value, a
params file, an input file or folder) given to `python stages/<stage>.py`, which must exit non-zero
with exactly one line `error: ...` on stderr naming the key or the file and what is wrong, write
no `--out` folder (nor its `.<name>.tmp` sibling) and leave the earlier artifacts as they were.

The shared `tiny_project` fixture (conftest.py) runs the tiny pipeline once, so each stage's real inputs exist; a bad
file is always a corrupted copy under the row's tmp_path, never an artifact changed in place.
"""
import copy
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from project import ROOT, run
from taming_official import official_model, write_release

pytestmark = pytest.mark.e2e

TINY = yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text())
CLASSES = TINY["world"]["classes"]            # circle, square, star
DOMAINS = TINY["world"]["eval_domains"]       # photo, sketch
N_SYNTH = TINY["prompts"]["per_class"] * len(CLASSES)                                      # 9
N_CAPTIONED = len(TINY["world"]["train_styles"]) * TINY["world"]["train_per_class_style"] * len(CLASSES)  # 54

# stage -> (script and fixed arguments, path arguments: artifact folders of the fixture)
STAGES = {
    "world": (["stages/world.py"], []),
    "teacher": (["stages/teacher.py"], ["world"]),
    "student_clip": (["stages/teacher.py", "--section", "student_clip"], ["world"]),
    "generator": (["stages/generator.py"], ["world"]),
    "prompts": (["stages/prompts.py"], ["teacher"]),
    "text_features": (["stages/text_features.py"], ["teacher"]),
    "synthesize": (["stages/synthesize.py"], ["prompts", "generator", "teacher", "text_features"]),
    "distill": (["stages/distill.py"], ["synth", "world", "teacher", "student_clip", "text_features"]),
    "evaluate": (["stages/evaluate.py"], ["world", "teacher", "student_clip", "text_features", "student"]),
}
ARTIFACT = {"world": "world", "teacher": "teacher", "student_clip": "student_clip", "generator": "generator",
            "prompts": "prompts", "text_features": "text_features", "synth": "synth", "student": "student"}
DROP = object()  # a `sets` value that deletes the key


def digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, and every folder (as 'dir')."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def project(tiny_project):
    return tiny_project[0]


# ---------------------------------------------------------------- bad files, made under the row's tmp_path

def png(path: Path, value: int = 0, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def pacs(root: Path, classes=CLASSES, domains=DOMAINS, n: int = 2) -> None:
    """A PACS-style folder <root>/<domain>/<class>/*.png that the world stage accepts."""
    for d in domains:
        for c in classes:
            for i in range(n):
                png(root / d / c / f"{i}.png", 40 * i)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def copy_artifact(art: Path, name: str, tmp: Path) -> Path:
    return Path(shutil.copytree(art / name, tmp / name))


TAMING_CONFIG = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
    "embed_dim": 32, "n_embed": 16, "ddconfig": {
        "double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}}


def taming_release(tmp: Path, config: dict | None = None) -> tuple[Path, Path]:
    """An official-layout release (configs/model.yaml, checkpoints/last.ckpt) of a tiny VQGAN."""
    good = copy.deepcopy(TAMING_CONFIG)
    cfg, ckpt = write_release(tmp / "release", good, official_model(good, seed=0).state_dict())
    if config is not None:
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    return cfg, ckpt


def without_ddconfig(tmp, art):
    cfg = copy.deepcopy(TAMING_CONFIG)
    del cfg["model"]["params"]["ddconfig"]
    taming_release(tmp, cfg)


def other_target(tmp, art):
    cfg = copy.deepcopy(TAMING_CONFIG)
    cfg["model"]["target"] = "taming.models.cond_transformer.Net2NetTransformer"
    taming_release(tmp, cfg)


def truncated_ckpt(tmp, art):
    truncate(taming_release(tmp)[1])


def teacher_as_ckpt(tmp, art):
    _, ckpt = taming_release(tmp)
    shutil.copy(art / "teacher" / "clip.pt", ckpt)


def words(name: str, data: bytes):
    def make(tmp, art):
        (tmp / name).write_bytes(data)
    return make


def folder_world(problem: str):
    def make(tmp, art):
        root = tmp / "pacs"
        if problem == "missing":
            return
        if problem == "file":
            root.write_text("not a folder\n")
            return
        root.mkdir()
        if problem == "empty":
            return
        pacs(root)
        if problem == "no_images":
            for f in (root / "photo").rglob("*.png"):
                f.unlink()
        elif problem == "foreign_class":
            png(root / "photo" / "dog" / "0.png")
        elif problem == "zero_byte_png":
            (root / "photo" / "star" / "bad.png").write_bytes(b"")
        elif problem == "truncated_jpeg":
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
                root / "sketch" / "circle" / "bad.jpg", quality=95)
            truncate(root / "sketch" / "circle" / "bad.jpg")
        elif problem == "text_as_png":
            (root / "photo" / "square" / "bad.png").write_text("this is a text file, not an image\n")
    return make


def no_class_folder(tmp, art):
    for i in range(2):  # images straight in the domain folder: <path>/photo/*.png, no class level
        png(tmp / "extra" / "photo" / f"{i}.png", 40 * i)


def student_as_teacher(tmp, art):
    (tmp / "teacher").mkdir()
    shutil.copy(art / "student" / "student.pt", tmp / "teacher" / "clip.pt")


def truncated_features(tmp, art):
    truncate(copy_artifact(art, "prompts", tmp) / "features.pt")


def truncated_shard(tmp, art):
    truncate(copy_artifact(art, "synth", tmp) / "shards" / "shard_00000.tar")


def embedded_teacher_weights(tmp, art):
    shutil.copy(art / "teacher" / "clip.pt", tmp / "embedded_teacher.pt")


# ---------------------------------------------------------------- the table

# Every stage validates the whole params file first, so rows that only change params run the
# lightest stage (world: no open_clip import); a few run the stage whose keys they change.

# world.source folder: nothing may train on the rendered world, so the teacher and generator come
# from elsewhere (as presets/pacs_vitb32.yaml); the world stage itself loads neither.
FOLDER_WORLD = {"world.source": "folder", "world.root": "{tmp}/pacs", "teacher.source": "open_clip",
                "teacher.pretrained": "random", "generator.source": "taming",
                "generator.taming_config": "{tmp}/release/configs/model.yaml",
                "generator.taming_checkpoint": "{tmp}/release/checkpoints/last.ckpt"}
TAMING = {"generator.source": "taming", "generator.taming_config": "{tmp}/release/configs/model.yaml",
          "generator.taming_checkpoint": "{tmp}/release/checkpoints/last.ckpt"}
OPEN_CLIP = {"teacher.source": "open_clip", "teacher.open_clip_model": "ViT-S-32", "teacher.pretrained": "random"}
MIX = {"prompts.method": "mix", "prompts.mix.styles_file": "{tmp}/styles.txt"}
KDPL_CA = {"distill.student": "kdpl", "distill.kdpl.class_agnostic": True, "distill.loss": "symmetric_kl",
           "distill.kdpl.classnames_file": "{tmp}/names.txt"}
NOT_UTF8 = "café\nmosaic\n".encode("latin-1")  # é is one byte (0xe9) that starts no UTF-8 sequence here


def bad(id, stage, needles, sets=None, prepare=None, args=None, text=None):
    """One row: `stage` run with tiny params changed by `sets` ({dotted key: value}), or a params
    file holding `text`; `prepare(tmp, artifacts)` makes the bad files; `args` overrides path
    arguments. The error line must contain every needle. '{tmp}' in values and needles is the
    row's tmp_path."""
    case = dict(stage=stage, needles=needles, sets=sets or {}, prepare=prepare, args=args or {}, text=text)
    return pytest.param(case, id=id)


ROWS = [
    # params.yaml itself
    bad("params-not-yaml", "world", ["params.yaml", "not valid YAML", "line 2"],
        text="world: [circle, square\nseed: 0\n"),
    bad("params-empty", "world", ["params.yaml", "is empty"], text=""),
    bad("params-a-list", "world", ["params.yaml", "must be a mapping", "list"], text="- seed\n- world\n"),
    bad("params-not-utf8", "world", ["params.yaml", "not utf-8"], text=b"seed: 0\nworld:\n  root: caf\xe9\n"),
    # keys and types
    bad("unknown-top-level-key", "world", ["unknown params key 'bogus'"], sets={"bogus": 1}),
    bad("unknown-nested-key", "world", ["unknown params key 'prompts.mix.bogus'"], sets={"prompts.mix.bogus": 2}),
    bad("string-for-int", "world", ["teacher.epochs", "must be an integer", "'ten'"], sets={"teacher.epochs": "ten"}),
    bad("list-for-string", "world", ["prompts.template", "must be a string"],
        sets={"prompts.template": ["a photo of a {}", "a {}"]}),
    bad("missing-required-key", "world", ["missing params key 'world.classes'"], sets={"world.classes": DROP}),
    # zero, negative, out of range
    bad("teacher-epochs-zero", "world", ["teacher.epochs", "must be > 0", "0"], sets={"teacher.epochs": 0}),
    bad("generator-steps-negative", "world", ["generator.steps", "must be > 0", "-1"], sets={"generator.steps": -1}),
    bad("synthesize-batch-size-zero", "world", ["synthesize.batch_size", "must be > 0"],
        sets={"synthesize.batch_size": 0}),
    bad("distill-batch-size-zero", "world", ["distill.batch_size", "must be > 0"], sets={"distill.batch_size": 0}),
    bad("distill-lr-negative", "distill", ["distill.lr", "must be > 0", "-1"], sets={"distill.lr": -1}),
    bad("teacher-lr-zero", "world", ["teacher.lr", "must be > 0"], sets={"teacher.lr": 0}),
    bad("synthesize-lr-negative", "world", ["synthesize.lr", "must be > 0"], sets={"synthesize.lr": -0.1}),
    bad("weight-decay-negative", "world", ["distill.weight_decay", "must be >= 0"],
        sets={"distill.weight_decay": -0.01}),
    bad("seed-negative", "world", ["'seed'", "must be >= 0"], sets={"seed": -1}),
    bad("text-width-not-divisible-by-heads", "world", ["teacher.text_width", "teacher.text_heads"],
        sets={"teacher.text_width": 30, "teacher.text_heads": 4}),
    # batches larger than the data
    bad("distill-batch-larger-than-synthesized-images", "distill", ["distill.batch_size", f"{N_SYNTH} synthesized"],
        sets={"distill.batch_size": N_SYNTH + 1, "distill.base_to_novel": False}),
    bad("distill-batch-larger-than-base-class-images", "world", ["distill.batch_size", "3 images of the 1 base class"],
        sets={"distill.batch_size": 4}),
    bad("distill-holdout-more-than-half-the-images", "distill", ["distill.holdout_images", "more than half"],
        sets={"distill.holdout_images": N_SYNTH}),
    bad("teacher-batch-larger-than-captioned-images", "world", ["teacher.batch_size", f"{N_CAPTIONED} captioned"],
        sets={"teacher.batch_size": N_CAPTIONED + 1}),
    # class names become folder names
    bad("class-name-empty", "world", ["world.classes[1]", "is empty"], sets={"world.classes": ["circle", "", "star"]}),
    bad("class-name-duplicate", "world", ["world.classes", "'circle' more than once"],
        sets={"world.classes": ["circle", "square", "circle"]}),
    bad("class-name-with-slash", "world", ["world.classes[1]", "'sq/uare'", "contains '/'"],
        sets={"world.classes": ["circle", "sq/uare", "star"]}),
    bad("class-not-renderable", "world", ["world.classes", "'dog'", "cannot render"],
        sets={"world.classes": ["circle", "dog", "star"]}),
    bad("image-size-not-divisible-by-vqgan-factor", "world", ["world.image_size", "18", "factor 4"],
        sets={"world.image_size": 18, "generator.ch_mult": [1, 1, 2]}),
    # world.source folder
    bad("folder-root-missing", "world", ["world.root", "{tmp}/pacs"], sets=FOLDER_WORLD,
        prepare=folder_world("missing")),
    bad("folder-root-is-a-file", "world", ["world.root", "{tmp}/pacs"], sets=FOLDER_WORLD,
        prepare=folder_world("file")),
    bad("folder-root-empty", "world", ["domain folder not found", "{tmp}/pacs/photo", "world.eval_domains"],
        sets=FOLDER_WORLD, prepare=folder_world("empty")),
    bad("folder-domain-without-images", "world", ["no images found", "{tmp}/pacs/photo"], sets=FOLDER_WORLD,
        prepare=folder_world("no_images")),
    bad("folder-class-not-in-world-classes", "world", ["{tmp}/pacs/photo/dog", "not in world.classes"],
        sets=FOLDER_WORLD, prepare=folder_world("foreign_class")),
    bad("folder-zero-byte-png", "world", ["corrupt or unreadable image", "photo/star/bad.png"], sets=FOLDER_WORLD,
        prepare=folder_world("zero_byte_png")),
    bad("folder-truncated-jpeg", "world", ["corrupt or unreadable image", "sketch/circle/bad.jpg"], sets=FOLDER_WORLD,
        prepare=folder_world("truncated_jpeg")),
    bad("folder-text-file-named-png", "world", ["corrupt or unreadable image", "photo/square/bad.png"],
        sets=FOLDER_WORLD, prepare=folder_world("text_as_png")),
    # eval.datasets
    bad("eval-dataset-without-path", "evaluate", ["eval.datasets[0].path"],
        sets={"eval.datasets": [{"name": "extra"}]}),
    bad("eval-dataset-without-class-folder", "evaluate", ["{tmp}/extra/photo", "no class folder"],
        sets={"eval.datasets": [{"name": "extra", "path": "{tmp}/extra"}]}, prepare=no_class_folder),
    # generator.source taming
    bad("taming-config-without-ddconfig", "generator", ["model.yaml", "ddconfig"], sets=TAMING,
        prepare=without_ddconfig),
    bad("taming-config-other-target", "generator", ["model.yaml", "Net2NetTransformer", "not supported"], sets=TAMING,
        prepare=other_target),
    bad("taming-checkpoint-truncated", "generator", ["last.ckpt", "unreadable or corrupt"], sets=TAMING,
        prepare=truncated_ckpt),
    bad("taming-checkpoint-is-a-teacher", "generator", ["last.ckpt", "do not fit the config"], sets=TAMING,
        prepare=teacher_as_ckpt),
    # teacher.source open_clip
    bad("open-clip-unknown-model", "teacher", ["unknown open_clip model 'ViT-Q-99'"],
        sets={**OPEN_CLIP, "teacher.open_clip_model": "ViT-Q-99"}),
    bad("open-clip-weights-missing", "teacher", ["CLIP checkpoint not found", "/nonexistent/x.pt"],
        sets={**OPEN_CLIP, "teacher.pretrained": "/nonexistent/x.pt"}),
    bad("student-clip-weights-missing", "student_clip", ["CLIP checkpoint not found", "/nonexistent/small.pt"],
        sets={"student_clip.source": "open_clip", "student_clip.open_clip_model": "ViT-S-32",
              "student_clip.pretrained": "/nonexistent/small.pt"}),
    bad("open-clip-weights-of-another-architecture", "teacher",
        ["cannot load open_clip ViT-S-32", "embedded_teacher.pt"],
        sets={**OPEN_CLIP, "teacher.pretrained": "{tmp}/embedded_teacher.pt"}, prepare=embedded_teacher_weights),
    # artifacts of the wrong kind, or truncated
    bad("student-checkpoint-as-teacher", "text_features", ["CLIP checkpoint", "{tmp}/teacher/clip.pt"],
        args={"teacher": "{tmp}/teacher"}, prepare=student_as_teacher),
    bad("prompt-features-truncated", "synthesize", ["prompt features", "{tmp}/prompts/features.pt", "unreadable"],
        args={"prompts": "{tmp}/prompts"}, prepare=truncated_features),
    bad("synth-shard-truncated", "distill", ["shard", "{tmp}/synth/shards/shard_00000.tar", "unreadable"],
        args={"synth": "{tmp}/synth"}, prepare=truncated_shard),
    # word lists: prompts.mix.styles_file, distill.kdpl.classnames_file
    bad("styles-file-empty", "prompts", ["style dictionary", "{tmp}/styles.txt", "is empty"], sets=MIX,
        prepare=words("styles.txt", b"")),
    bad("styles-file-blank-lines-only", "prompts", ["style dictionary", "{tmp}/styles.txt", "is empty"], sets=MIX,
        prepare=words("styles.txt", b"\n   \n\t\n")),
    bad("styles-file-not-utf8", "prompts", ["style dictionary", "{tmp}/styles.txt", "not UTF-8"], sets=MIX,
        prepare=words("styles.txt", NOT_UTF8)),
    bad("styles-fewer-than-mix-k", "prompts", ["prompts.mix.k = 3", "2 styles"], sets={**MIX, "prompts.mix.k": 3},
        prepare=words("styles.txt", b"neon\nmosaic\n")),
    bad("classnames-file-empty", "distill", ["class-name dictionary", "{tmp}/names.txt", "is empty"], sets=KDPL_CA,
        prepare=words("names.txt", b"")),
    bad("classnames-file-blank-lines-only", "distill", ["class-name dictionary", "{tmp}/names.txt", "is empty"],
        sets=KDPL_CA, prepare=words("names.txt", b"  \n\n \n")),
    bad("classnames-file-not-utf8", "distill", ["class-name dictionary", "{tmp}/names.txt", "not UTF-8"], sets=KDPL_CA,
        prepare=words("names.txt", NOT_UTF8)),
    bad("classnames-fewer-than-topk", "distill", ["distill.kdpl.topk", "3 names", "{tmp}/names.txt"],
        sets={**KDPL_CA, "distill.kdpl.topk": 5}, prepare=words("names.txt", b"dog\ncat\nbird\n")),
    # prompt-student hyper-parameters the small CLIP cannot take
    bad("kdpl-n-ctx-disagrees-with-ctx-init", "distill", ["distill.kdpl.ctx_init", "4 tokens",
                                                          "distill.kdpl.n_ctx is 3"],
        sets={"distill.student": "kdpl", "distill.kdpl.n_ctx": 3}),
    bad("promptkd-prompt-depth-beyond-the-tower", "distill", ["distill.promptkd.prompt_depth", "0..4"],
        sets={"distill.student": "promptkd", "distill.loss": "promptkd", "distill.promptkd.prompt_depth": 5}),
]


def tiny_params_with(sets: dict, fmt) -> dict:
    params = copy.deepcopy(TINY)
    for key, value in sets.items():
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = fmt(value)
    return params


@pytest.mark.parametrize("case", ROWS)
def test_bad_input_fails_with_one_line_and_writes_nothing(project, tmp_path, case):
    dst = project
    art = dst / "artifacts"
    before = digest(art)

    def fmt(value):
        if isinstance(value, str):
            return value.replace("{tmp}", str(tmp_path))
        if isinstance(value, list):
            return [fmt(v) for v in value]
        if isinstance(value, dict):
            return {k: fmt(v) for k, v in value.items()}
        return value

    if case["prepare"]:
        case["prepare"](tmp_path, art)
    params = tmp_path / "params.yaml"
    if case["text"] is None:
        params.write_text(yaml.safe_dump(tiny_params_with(case["sets"], fmt), sort_keys=False))
    elif isinstance(case["text"], bytes):
        params.write_bytes(case["text"])
    else:
        params.write_text(case["text"])
    script, path_args = STAGES[case["stage"]]
    args = {name: str(art / ARTIFACT[name]) for name in path_args}
    args.update({k: fmt(v) for k, v in case["args"].items()})
    out = tmp_path / "out"
    cmd = [sys.executable, *script, "--params", str(params), *(a for k, v in args.items() for a in (f"--{k}", v)),
           "--out", str(out)]
    proc = run(cmd, dst, check=False)
    leftovers = [p.name for p in (out, out.with_name(f".{out.name}.tmp")) if p.exists()]
    err = proc.stderr.strip()
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode != 0, shown
    assert "Traceback" not in err, shown
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for needle in case["needles"]:
        assert fmt(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert leftovers == [], f"left {leftovers} behind"
    assert digest(art) == before, "the fixture's artifacts changed"


def test_the_table_is_large_and_its_ids_unique():
    ids = [row.id for row in ROWS]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert {row.values[0]["stage"] for row in ROWS} == set(STAGES)  # every stage checks its inputs
