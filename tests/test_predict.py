"""clipdistill.predict on tiny ONNX models built with onnx.helper (no torch needed): predictions
against a numpy reimplementation, input expansion, error rows, usage errors and the output file."""
import csv
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from clipdistill import predict

ROOT = Path(__file__).resolve().parents[1]
S = 8
CLASSES = ["cat", "dog", "fish", "owl"]
# Non-square sizes take the card's resize path (squash, bicubic, so the reference below can resize
# with one PIL call); one S x S image does not; modes cover convert("RGB").
IMAGE_SPECS = [("a.png", (13, 9), "RGB"), ("b.png", (S, S), "RGB"), ("c.png", (21, 30), "L"),
               ("d.jpg", (5, 17), "RGB"), ("e.png", (40, 11), "RGBA")]


def save_onnx(path: Path, weights: np.ndarray) -> None:
    """images float [N, 3, S, S] -> ReduceMean over H, W -> MatMul W [3, C] -> logits [N, C].

    Opset 17, where ReduceMean still takes `axes` as an attribute (an input from opset 18).
    """
    nodes = [helper.make_node("ReduceMean", ["images"], ["pooled"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny_student",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, S, S])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weights.shape[1]])],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the oldest IR for opset 17, so any recent onnxruntime accepts it
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_meta(path: Path, classes=CLASSES, **input_fields) -> Path:
    """The metadata JSON the pipeline exports beside a model; `input_fields` override `input`."""
    inp = {"size": S, "layout": "NCHW", "range": [0, 1], "resize_mode": "squash", "interpolation": "bicubic",
           "fill_color": 0,
           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "normalised_by_model": True}
    meta = {"classes": classes, "input": {**inp, **input_fields}, "outputs": "logits", "made_by": {}}
    path.write_text(json.dumps(meta))
    return path


def save_image(path: Path, size, mode, rng) -> Path:
    """A tinted noise image, so different images get clearly different logits."""
    w, h = size
    tint = rng.integers(0, 256, 3)
    pixels = np.clip(tint + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture
def weights():
    return np.random.default_rng(0).normal(scale=8, size=(3, len(CLASSES))).astype(np.float32)


@pytest.fixture
def model(tmp_path, weights):
    path = tmp_path / "student.onnx"
    save_onnx(path, weights)
    write_meta(path.with_suffix(".json"))
    return path


@pytest.fixture
def images(tmp_path):
    """Five images in tmp/imgs, listed in the sorted order a folder expands to."""
    rng = np.random.default_rng(1)
    return [save_image(tmp_path / "imgs" / name, size, mode, rng) for name, size, mode in IMAGE_SPECS]


def reference_probs(paths, weights, mean=None, std=None) -> np.ndarray:
    """[N, C] softmax probabilities from numpy alone: the pipeline's reader, then the tiny graph."""
    arrays = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (S, S):
                im = im.resize((S, S), Image.BICUBIC)
            arrays.append(np.asarray(im, dtype=np.uint8))
    x = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / 255
    if mean is not None:
        x = (x - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]
    logits = x.astype(np.float64).mean(axis=(2, 3)) @ weights.astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def parse_csv(text: str) -> list[tuple[str, list[tuple[str, float]], str]]:
    """(path, [(class, prob), ...], error) per row, from either output format."""
    header, *rows = list(csv.reader(io.StringIO(text)))
    k = (len(header) - 2) // 2
    assert header == ["path", *[f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")], "error"]
    return [(r[0], [(r[i], float(r[i + 1])) for i in range(1, 2 * k, 2) if r[i]], r[-1]) for r in rows]


def parse_json(text: str) -> list[tuple[str, list[tuple[str, float]], str]]:
    return [(r["path"], [(t["class"], t["prob"]) for t in r["top"]], r["error"] or "")
            for r in json.loads(text)]


def assert_matches_reference(rows, paths, weights, k, **norm):
    """Rows are the given paths in order, each with the reference's top-k classes and probabilities."""
    probs = reference_probs(paths, weights, **norm)
    assert [row[0] for row in rows] == [str(p) for p in paths]
    for (_, top, error), p in zip(rows, probs):
        order = np.argsort(-p)[:k]
        assert error == ""
        assert [c for c, _ in top] == [CLASSES[j] for j in order]
        np.testing.assert_allclose([q for _, q in top], p[order], rtol=0, atol=1e-6)


def test_csv_output_file_matches_numpy_reference(model, images, weights, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    # batch size 2 over 5 images: two full batches and a partial one
    assert predict.main([str(model), str(tmp_path / "imgs"), "--top-k", "3", "--batch-size", "2",
                         "--output", str(out)]) == 0
    assert_matches_reference(parse_csv(out.read_text()), images, weights, k=3)
    assert capsys.readouterr() == ("", "")  # nothing on stdout; tqdm is off when stderr is no TTY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "preds.csv", "student.json", "student.onnx"]


def test_json_on_stdout_caps_k_at_the_number_of_classes(model, images, weights, capsys):
    assert predict.main([str(model), *map(str, images), "--format", "json", "--top-k", "10"]) == 0
    rows = parse_json(capsys.readouterr().out)
    assert_matches_reference(rows, images, weights, k=len(CLASSES))
    assert all(abs(sum(q for _, q in top) - 1) < 1e-9 for _, top, _ in rows)


def test_normalisation_applied_when_the_model_does_not_normalise(model, images, weights, capsys):
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    meta = write_meta(model.with_name("raw.json"), mean=mean, std=std, normalised_by_model=False)
    assert predict.main([str(model), *map(str, images), "--meta", str(meta), "--format", "json"]) == 0
    rows = parse_json(capsys.readouterr().out)
    assert_matches_reference(rows, images, weights, k=len(CLASSES), mean=mean, std=std)
    # and the normalisation matters here, so skipping it could not pass the check above
    plain = reference_probs(images, weights)
    assert np.abs(plain - reference_probs(images, weights, mean=mean, std=std)).max() > 1e-3


def test_folders_and_globs_expand_in_order_without_duplicates(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    monkeypatch.chdir(tmp_path)
    for name in ["d/z.png", "d/sub/b.JPG", "d/a.webp", "g/x1.png", "g/x2.png", "g/deep/x3.png"]:
        save_image(Path(name), (4, 4), "RGB", rng)
    Path("d/notes.txt").write_text("not an image")
    Path("g/x9.txt").write_text("not an image")
    Image.open("g/x1.png").save("odd.dat", format="PNG")  # an explicit file keeps any suffix

    paths = predict.expand_inputs(["g/x2.png", "d", "./d/a.webp", "g/**/x*", "odd.dat", "g/x?.png"])
    assert [str(p) for p in paths] == ["g/x2.png", "d/a.webp", "d/sub/b.JPG", "d/z.png",
                                       "g/deep/x3.png", "g/x1.png", "odd.dat"]


def test_corrupt_images_get_error_rows_and_exit_1(model, images, weights, tmp_path, capsys):
    junk = tmp_path / "imgs" / "x.png"
    junk.write_bytes(np.random.default_rng(3).bytes(300))
    truncated = tmp_path / "imgs" / "t.png"
    truncated.write_bytes(images[4].read_bytes()[:60])
    assert predict.main([str(model), str(tmp_path / "imgs"), "--top-k", "2"]) == 1
    rows = {path: (top, error) for path, top, error in parse_csv(capsys.readouterr().out)}
    assert rows.pop(str(junk)) == ([], "unreadable image: UnidentifiedImageError")
    top, error = rows.pop(str(truncated))
    assert top == [] and error.startswith("unreadable image: ")
    good = [(str(p), *rows[str(p)]) for p in images]
    assert_matches_reference(good, images, weights, k=2)


def _meta_without(tmp_path, key):
    """--meta for a metadata file lacking `key` ("classes", or "size" from its input)."""
    raw = json.loads(write_meta(tmp_path / "m.json").read_text())
    del (raw["input"] if key == "size" else raw)[key]
    (tmp_path / "m.json").write_text(json.dumps(raw))
    return ["--meta", str(tmp_path / "m.json")]


# Each: the arguments after MODEL and the images folder (by name, from tmp_path), and text the
# one-line error must contain (the file or option at fault).
USAGE_ERRORS = {
    "model missing": (lambda t: [str(t / "nope.onnx"), str(t / "imgs")], "nope.onnx"),
    "model suffix": (lambda t: [str(t / "student.h5"), str(t / "imgs")], "student.h5"),
    "meta missing": (lambda t: [str(t / "student.onnx"), str(t / "imgs"), "--meta", str(t / "no.json")],
                     "no.json"),
    "meta classes": (lambda t: [str(t / "student.onnx"), str(t / "imgs"), *_meta_without(t, "classes")],
                     "'classes'"),
    "meta size": (lambda t: [str(t / "student.onnx"), str(t / "imgs"), *_meta_without(t, "size")],
                  "'input.size'"),
    "input missing": (lambda t: [str(t / "student.onnx"), str(t / "gone.png")], "gone.png"),
    "no match": (lambda t: [str(t / "student.onnx"), str(t / "imgs" / "*.tiff")], "*.tiff"),
    "top-k": (lambda t: [str(t / "student.onnx"), str(t / "imgs"), "--top-k", "0"], "--top-k"),
    "batch-size": (lambda t: [str(t / "student.onnx"), str(t / "imgs"), "--batch-size", "-3"],
                   "--batch-size"),
    "output folder": (lambda t: [str(t / "student.onnx"), str(t / "imgs"), "--output", str(t / "no/o.csv")],
                      "--output"),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_usage_errors_print_one_line_and_write_nothing(case, model, images, tmp_path, capsys):
    make_args, named = USAGE_ERRORS[case]
    out = tmp_path / "out.csv"
    # the case's own --output, if any, comes later and so wins
    assert predict.main(["--output", str(out), *make_args(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: ")
    assert named in captured.err
    assert not out.exists() and not (tmp_path / "no").exists()


def test_failed_write_leaves_the_old_output_and_no_temporary(model, images, tmp_path, monkeypatch):
    out = tmp_path / "preds.csv"
    out.write_text("previous run\n")

    def write_then_fail(results, k, f):
        f.write("path,class_1\nhalf")
        raise RuntimeError("disk went away")
    monkeypatch.setitem(predict.FORMATTERS, "csv", write_then_fail)
    with pytest.raises(RuntimeError):
        predict.main([str(model), str(tmp_path / "imgs"), "--output", str(out)])
    assert out.read_text() == "previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "preds.csv", "student.json", "student.onnx"]


def test_onnx_path_never_imports_torch(model, images, weights):
    argv = ["predict", str(model), str(images[0].parent), "--top-k", "2"]
    code = ("import sys, runpy; sys.modules['torch'] = None; "  # any `import torch` now raises
            f"sys.argv = {argv!r}; runpy.run_module('clipdistill.predict', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_matches_reference(parse_csv(proc.stdout), images, weights, k=2)


def test_pt_checkpoint_goes_through_load_student_without_grad(model, images, weights, monkeypatch, capsys):
    import torch

    grad_enabled, loaded = [], []

    class FakeStudent(torch.nn.Module):  # the same graph as the ONNX model
        def forward(self, x):
            grad_enabled.append(torch.is_grad_enabled())
            return x.mean(dim=(2, 3)) @ torch.from_numpy(weights)

    def load_student(path):
        loaded.append(Path(path))
        return FakeStudent().eval()

    # a stand-in module, so the test needs neither a real checkpoint nor the rest of the package
    students = types.ModuleType("clipdistill.students")
    students.load_student = load_student
    monkeypatch.setitem(sys.modules, "clipdistill.students", students)
    checkpoint = model.with_suffix(".pt")
    checkpoint.write_bytes(b"")  # only its existence is checked before load_student
    assert predict.main([str(checkpoint), *map(str, images), "--batch-size", "3"]) == 0
    assert loaded == [checkpoint] and grad_enabled == [False, False]
    assert_matches_reference(parse_csv(capsys.readouterr().out), images, weights, k=len(CLASSES))
