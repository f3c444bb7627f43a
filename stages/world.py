"""Stage `world`: the images the pipeline evaluates on.

world.source embedded renders the procedural domain-shift world as image folders:
<out>/train/<style>/<class>/*.png with captions.csv (the teacher's training split, more styles than
are evaluated), <out>/test/<domain>/<class>/*.png (disjoint renders) and, with world.val_styles,
<out>/val/<style>/<class>/*.png: disjoint renders of training styles that are never evaluated, the
split every default is chosen on.
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

from clipdistill.data import check_readable, list_images, load_domain_folder
from clipdistill.params import load_params
from clipdistill.preprocess import clip_default
from clipdistill.runtime import PipelineError, atomic_dir, run_stage, stage_args
from clipdistill.world import render_split


def main():
    args = stage_args(__doc__, "out")
    params = load_params(args.params)
    with atomic_dir(args.out) as tmp:
        if params.world.source == "folder":
            root = Path(params.world.root)
            if root.exists() and not root.is_dir():
                raise PipelineError(f"world.root {root} is a file; it must be the image folder "
                                    f"(<root>/<domain>/<class>/*)")
            if not root.is_dir():
                raise PipelineError(f"image folder not found: {root} (world.root): download the dataset (for PACS, its "
                                    f"kfold folder) and place it so that {root}/<domain>/<class>/ holds the images")
            # Decodes every image once (and keeps none): a corrupt file fails here, with its name, not hours later.
            data = load_domain_folder(root, list(params.world.classes), clip_default(8), list(params.world.eval_domains))
            for images in data.values():
                check_readable(images, params.data.workers)
            rows = [{"domain": dom, "class": cls, "path": str(f.relative_to(root)), "bytes": f.stat().st_size}
                    for dom in params.world.eval_domains for cls in params.world.classes if (root / dom / cls).is_dir()
                    for f in list_images(root / dom / cls)]
            pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
            counts = {dom: len(images) for dom, images in data.items()}
            print(f"world: folder {root}: {counts} images in {len(params.world.classes)} classes")
            return
        n_train = render_split(tmp, "train", params.world.classes, params.world.train_styles, params.world.train_per_class_style,
                               params.world.image_size, params.seed, with_captions=True)
        n_test = render_split(tmp, "test", params.world.classes, params.world.eval_domains, params.world.test_per_class_domain,
                              params.world.image_size, params.seed, with_captions=False)
        n_val = render_split(tmp, "val", params.world.classes, params.world.val_styles, params.world.val_per_class_style,
                             params.world.image_size, params.seed, with_captions=False) if params.world.val_styles else 0
    print(f"world: {n_train} train, {n_test} test and {n_val} validation images at {params.world.image_size} px")


if __name__ == "__main__":
    run_stage(main)
