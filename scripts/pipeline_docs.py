#!/usr/bin/env python3
"""Make docs/pipeline.md's material: full-size stage tables and a GPipe-beside-1F1B timeline from real traces.

    python scripts/pipeline_docs.py tables            # VGG16, ResNet-50, ViT-B/16 (224 px, 1000 classes), markdown
    python scripts/pipeline_docs.py timeline [--out docs/pipeline_timeline.png]
    python scripts/pipeline_docs.py interleaved [--out docs/pipeline_interleaved.png]

``tables`` cuts the full-size models with ``balance="flops"`` and
``"params"`` (``tfpar.pipeline.plan_stages``; built in ``keras.StatelessScope``,
so weights get shapes but no memory, and nothing is trained). The
timeline trains a small ResNet-18 with ``tfpar-train --strategy=pipeline``
on 2 logical CPUs, once per schedule, traces 2 steps, and draws the first
(``tfpar.parallel.pipeline.timeline``). ``interleaved`` runs 1F1B (2 stages)
and interleaved 1F1B (4 stages, 2 a process) on 2 worker processes through
``tfpar-launch`` and draws each from its summary.json. Needs matplotlib.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tables(stages=4):
    import keras

    from tfpar import models
    from tfpar.parallel import pipeline

    out = []
    for name in ("vgg16", "resnet50", "vit_b16"):
        with keras.StatelessScope():  # shapes only: nothing is allocated
            model = models.build(name, num_classes=1000, input_shape=(224, 224, 3))
        for kind in ("flops", "params"):
            _, counts, rows = pipeline.plan_stages(model, stages, balance=kind)
            most = max(r["flops_per_image"] for r in rows) / sum(r["flops_per_image"] for r in rows)
            out.append(f"### {name}, {stages} stages, balance={kind} (slowest stage {most:.0%} of the FLOPs)\n")
            out.append("| stage | layers | params | GFLOPs/image | cut MB/image | first..last layer |")
            out.append("|---:|---:|---:|---:|---:|---|")
            for r in rows:
                cut = f"{r['cut_bytes_per_image'] / 2**20:.2f}" if r["cut_bytes_per_image"] else "-"
                out.append(f"| {r['stage']} | {r['layers']} | {r['params']:,} | {r['flops_per_image'] / 1e9:.2f} "
                           f"| {cut} | {r['first_layer']}..{r['last_layer']} |")
            out.append("")
    return "\n".join(out)


def timeline(path):
    from tfpar.core import trace
    from tfpar.parallel.pipeline import timeline as timeline_lib

    found = []
    for schedule in ("gpipe", "1f1b"):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "tfpar.cli", "--strategy=pipeline", "--stages=2", "--micro_batches=4",
                       f"--schedule={schedule}", "--balance=flops", "--model=resnet18", "--width_multiplier=0.25",
                       "--image_size=32", "--batch_size=32", "--epochs=1", "--steps_per_epoch=5",
                       "--validation_steps=0", "--profile_steps=3,4", "--verbose=0", f"--model_dir={tmp}"]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            found.append(timeline_lib.read(trace.find(tmp)[0]))
    timeline_lib.plot(found, path, titles=["GPipe, 2 stages x 4 micro-batches", "1F1B, 2 stages x 4 micro-batches"])
    return found


def interleaved(path, micro=4):
    """1F1B (2 stages) beside interleaved 1F1B (4 stages, 2 a task) on 2 worker processes, the same M."""
    from tfpar.parallel.pipeline import timeline as timeline_lib

    found, titles = [], []
    for stages, schedule in ((2, "1f1b"), (4, "interleaved_1f1b")):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--timeout", "900", "--",
                       sys.executable, "-m", "tfpar.cli", "--strategy=pipeline", f"--stages={stages}",
                       f"--micro_batches={micro}", f"--schedule={schedule}", "--balance=time", "--model=resnet18",
                       "--width_multiplier=0.25", "--image_size=32", "--batch_size=64", "--epochs=1",
                       "--steps_per_epoch=5", "--validation_steps=0", "--profile_steps=3,4", "--verbose=0",
                       "--checkpoint_best=false", "--backup_freq=none", f"--model_dir={tmp}"]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(tmp, "summary.json")) as f:
                piped = json.load(f)["pipeline"]
            found.append(dict(piped["timeline"], bubble_theory=piped["bubble_theory"]))
            titles.append(f"{schedule}, {stages} stages on 2 processes x {micro} micro-batches")
    timeline_lib.plot(found, path, titles=titles)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("tables", "timeline", "interleaved"))
    parser.add_argument("--out", help="the PNG (default docs/pipeline_timeline.png, docs/pipeline_interleaved.png)")
    args = parser.parse_args(argv)
    docs = os.path.join(os.path.dirname(__file__), "..", "docs")
    if args.what == "tables":
        print(tables())
    else:
        args.out = args.out or os.path.join(docs, f"pipeline_{args.what}.png")
        found = (timeline if args.what == "timeline" else interleaved)(args.out)
        print(json.dumps([{k: v for k, v in t.items() if k != "tasks"} for t in found]))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
