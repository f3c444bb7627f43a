"""Stage `world`: the images the pipeline evaluates on.

world.source embedded renders the procedural domain-shift world as image folders:
<out>/train/<style>/<class>/*.png with captions.csv (the teacher's training split, more styles than
are evaluated) and <out>/test/<domain>/<class>/*.png (disjoint renders).
world.source folder checks a PACS-style dataset at world.root (<root>/<domain>/<class>/*: every
evaluated domain present, every class folder named in world.classes, every image readable) and
writes <out>/manifest.csv (domain, class, path, bytes); later stages read the images in place.
DVC does not watch world.root itself: after changing the files there, run `dvc repro -f -s world`.
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import pandas as pd

from clipdistill.data import list_images, load_domain_folder
from clipdistill.params import load_params
from clipdistill.runtime import PipelineError, atomic_dir, run_stage, stage_args
from clipdistill.world import render_split


def main():
    args = stage_args(__doc__, "out")
    p = load_params(args.params)
    w = p.world
    with atomic_dir(args.out) as tmp:
        if w.source == "folder":
            root = Path(w.root)
            if root.exists() and not root.is_dir():
                raise PipelineError(f"world.root {root} is a file; it must be the image folder "
                                    f"(<root>/<domain>/<class>/*)")
            if not root.is_dir():
                raise PipelineError(f"image folder not found: {root} (world.root): download the dataset (for PACS, its "
                                    f"kfold folder) and place it so that {root}/<domain>/<class>/ holds the images")
            # Reads every image once: a corrupt file fails here, with its name, not hours later.
            data = load_domain_folder(root, list(w.classes), 8, list(w.eval_domains))
            rows = [{"domain": dom, "class": cls, "path": str(f.relative_to(root)), "bytes": f.stat().st_size}
                    for dom in w.eval_domains for cls in w.classes if (root / dom / cls).is_dir()
                    for f in list_images(root / dom / cls)]
            pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
            counts = {dom: len(labels) for dom, (_, labels) in data.items()}
            print(f"world: folder {root}: {counts} images in {len(w.classes)} classes")
            return
        n_train = render_split(tmp, "train", w.classes, w.train_styles, w.train_per_class_style,
                               w.image_size, p.seed, with_captions=True)
        n_test = render_split(tmp, "test", w.classes, w.eval_domains, w.test_per_class_domain,
                              w.image_size, p.seed, with_captions=False)
    print(f"world: {n_train} train and {n_test} test images at {w.image_size} px")


if __name__ == "__main__":
    run_stage(main)
