"""Stage `world`: render the embedded domain-shift world as image folders.

Writes <out>/train/<style>/<class>/*.png with captions.csv (the teacher's training split, more
styles than are evaluated) and <out>/test/<domain>/<class>/*.png (disjoint renders).
"""
from clipdistill.params import load_params
from clipdistill.runtime import atomic_dir, run_stage, stage_args
from clipdistill.world import render_split


def main():
    args = stage_args(__doc__, "out")
    p = load_params(args.params)
    w = p.world
    with atomic_dir(args.out) as tmp:
        n_train = render_split(tmp, "train", w.classes, w.train_styles, w.train_per_class_style,
                               w.image_size, p.seed, with_captions=True)
        n_test = render_split(tmp, "test", w.classes, w.eval_domains, w.test_per_class_domain,
                              w.image_size, p.seed, with_captions=False)
    print(f"world: {n_train} train and {n_test} test images at {w.image_size} px")


if __name__ == "__main__":
    run_stage(main)
