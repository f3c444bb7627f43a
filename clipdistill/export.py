"""Students, and the teacher's image tower, as standalone image classifiers another program can run.

Each becomes a module from images [B, 3, S, S] in [0, 1] to logits [B, C] with everything learned
folded into fixed weights (prompts, contexts, KDPL's text features computed once), saved as ONNX
(dynamic batch) and as a `torch.export` program, with a JSON card: class names, input size,
mean and std (applied inside the model), and how it was made. `parity` checks an exported file
against the PyTorch module on real images.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .preprocess import Preprocess
from .runtime import PipelineError

ONNX_OPSET = 18  # the opset torch.onnx writes natively: no version conversion step
MAX_ABS_DIFF = 1e-4      # export parity: logits may differ by at most this much
MIN_ARGMAX_AGREEMENT = 0.999  # and the top class must agree on at least this share of images


def card(model: nn.Module, classes: list[str], prep: Preprocess, made_by: dict) -> dict:
    """The JSON beside an exported classifier (what `clipdistill.predict` reads): input side and
    the pipeline's decoding geometry (`prep`: resize mode, interpolation, fill), so predict
    decodes a file exactly as the stages did."""
    return {"classes": list(classes),
            "input": {"size": prep.size, "layout": "NCHW", "range": [0, 1], "resize_mode": prep.resize_mode,
                      "interpolation": prep.interpolation, "fill_color": prep.fill_color,
                      "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                      "normalised_by_model": True},
            "outputs": "logits",
            "made_by": made_by}


def _example(image_size: int) -> tuple[torch.Tensor]:
    """The traced input: two images, so the batch axis stays symbolic."""
    return (torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)),)


DYNAMIC_BATCH = ({0: torch.export.Dim("batch", min=1)},)


def export_onnx(model: nn.Module, path: Path, image_size: int) -> None:
    """ONNX (opset ONNX_OPSET) with a dynamic batch: input `images`, output `logits`, one self-contained file."""
    program = torch.onnx.export(model.eval(), _example(image_size), dynamo=True, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=DYNAMIC_BATCH,
                                opset_version=ONNX_OPSET, verbose=False)
    for node in program.model.graph.all_nodes():
        # debugging aids that name this checkout's source files: the same model exported from
        # another folder must give the same file
        node.metadata_props.clear()
    program.save(str(path), external_data=False)


def export_program(model: nn.Module, path: Path, image_size: int) -> None:
    """A `torch.export` program (`torch.export.load(path).module()` runs it, no clipdistill needed)."""
    program = torch.export.export(model.eval(), _example(image_size), dynamic_shapes=DYNAMIC_BATCH)
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)  # names this checkout's source files (see export_onnx)
    torch.export.save(program, str(path))


def onnx_logits(path: Path, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """Logits [N, C] of an ONNX classifier under onnxruntime on uint8 images [N, 3, S, S]."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch_size].float().div(255).numpy()})[0]
                           for i in range(0, len(images), batch_size)])


@torch.no_grad()
def torch_logits(model, images: torch.Tensor, batch_size: int) -> np.ndarray:
    return torch.cat([model(images[i:i + batch_size].float().div(255)) for i in range(0, len(images), batch_size)]
                     ).numpy()


def parity(reference: np.ndarray, exported: np.ndarray, what: str) -> dict:
    """{max_abs_diff, argmax_agreement, images} of exported logits against PyTorch's; a PipelineError
    when they break MAX_ABS_DIFF or MIN_ARGMAX_AGREEMENT (the file must not be used)."""
    result = {"max_abs_diff": float(np.abs(reference - exported).max()),
              "argmax_agreement": float((reference.argmax(1) == exported.argmax(1)).mean()),
              "images": int(len(reference))}
    if result["max_abs_diff"] > MAX_ABS_DIFF or result["argmax_agreement"] < MIN_ARGMAX_AGREEMENT:
        raise PipelineError(f"{what} does not match PyTorch: max |logit diff| {result['max_abs_diff']:.2e} "
                            f"(limit {MAX_ABS_DIFF}), argmax agreement {result['argmax_agreement']:.4f} "
                            f"(at least {MIN_ARGMAX_AGREEMENT})")
    return result


def export_classifier(model: nn.Module, out: Path, name: str, classes: list[str], prep: Preprocess, made_by: dict,
                      images: torch.Tensor, batch_size: int) -> dict:
    """Write <name>.onnx, <name>.pt2 and <name>.json to `out` and check both files against `model`
    on uint8 `images`; returns the parity figures."""
    model = model.cpu().eval()
    export_onnx(model, out / f"{name}.onnx", prep.size)
    export_program(model, out / f"{name}.pt2", prep.size)
    (out / f"{name}.json").write_text(json.dumps(card(model, classes, prep, made_by), indent=2) + "\n")
    reference = torch_logits(model, images, batch_size)
    program = torch.export.load(str(out / f"{name}.pt2")).module()
    return {"onnx": parity(reference, onnx_logits(out / f"{name}.onnx", images, batch_size), f"{name}.onnx"),
            "torch_export": parity(reference, torch_logits(program, images, batch_size), f"{name}.pt2")}
