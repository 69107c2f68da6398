#!/usr/bin/env python3
"""Images/sec side by side: tfpar vs plain Keras, vs tf_keras, 2 workers vs 1, bf16 vs fp32, XLA.

Every comparison is measured in one run as a ratio, each side in its own fresh
process (so device set-up, threads and memory never leak between cases), on
synthetic data of the model's size. A case reports the median images/sec over
several timed windows after warm-up, and the spread (min, max) of those
windows. Results go to benchmarks/results/<machine>-<date>.json and .md (and a
PNG chart when matplotlib is installed: pip install -e ".[dev]").

  scripts/benchmark.py                 # the CPU suite (about 15 minutes on 2 cores)
  scripts/benchmark.py --suite quick   # a 2-minute smoke run of the same machinery
  scripts/benchmark.py --suite gpu     # ResNet-50 224px mixed_float16 + XLA, MFU, mirrored on all GPUs
  scripts/benchmark.py --only precision,xla
"""

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
TF_KERAS_VENV = os.path.join(REPO, "benchmarks", ".venv-tf-keras")

# Dense peak TFLOP/s for the training precision used on each GPU (fp16/bf16 tensor cores).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0, "L4": 121.0, "T4": 65.0, "A10": 125.0}
# Forward multiply-adds per image at 224x224 (ResNet-50 v1.5); training ~ 3 x 2 x MACs FLOPs.
RESNET50_MACS_224 = 4.09e9


# --------------------------------------------------------------------------- one measurement

def _window_timer(keras_module, batch, warmup_windows, skip_steps=2):
    """A Callback (for Keras 3 or tf_keras) timing each epoch as one window.

    Same window as tfpar's ThroughputLogger: the first ``skip_steps`` steps of
    an epoch are left out, the clock stops at the last training batch.
    """

    class WindowTimer(keras_module.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rates = []

        def on_epoch_begin(self, epoch, logs=None):
            self._steps, self._t0 = 0, None

        def on_train_batch_end(self, step, logs=None):
            self._steps += 1
            self._t1 = time.perf_counter()
            if self._steps == skip_steps:
                self._t0 = self._t1

        def on_epoch_end(self, epoch, logs=None):
            if epoch >= warmup_windows and self._steps > skip_steps:
                self.rates.append((self._steps - skip_steps) * batch / (self._t1 - self._t0))

    return WindowTimer()


def _synthetic(tf, batch, size, classes, seed=0):
    images = tf.random.stateless_uniform((batch, size, size, 3), seed=(seed, 1))
    labels = tf.random.stateless_uniform((batch,), seed=(seed, 2), maxval=classes, dtype=tf.int32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)


def _pin_to_core():
    """One core per worker (its TF_CONFIG index) with single-threaded TF pools."""
    index = json.loads(os.environ.get("TF_CONFIG", '{"task": {"index": 0}}'))["task"]["index"]
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[index % len(cores)]})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def measure(case):
    """Run one case in this process and return {'rates': [...], ...}."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if case.get("pin"):
        _pin_to_core()
    kind = case["kind"]
    if kind == "tfpar":
        return _measure_tfpar(case)
    return _measure_plain(case, tf_keras=(kind == "tf_keras"))


def _measure_tfpar(case):
    """The tfpar-train path: TrainConfig -> train.run on synthetic data."""
    from tfpar import train

    windows = case["windows"] + case["warmup_windows"]
    options = dict(
        model=case["model"], num_classes=case["classes"], image_size=case["image"],
        strategy=case.get("strategy", "one_device"), virtual_cpus=case.get("virtual_cpus"),
        precision=case.get("precision", "float32"), data="synthetic", batch_size=case["batch"],
        epochs=windows, steps_per_epoch=case["steps"], validation_steps=1, optimizer="sgd",
        learning_rate=0.01, model_dir=case["model_dir"], tensorboard=False, checkpoint_best=False, verbose=0,
        backup_freq="none",
        **({"jit_compile": case["jit_compile"]} if "jit_compile" in case else {}),
    )
    options.update(case.get("train_options", {}))  # any TrainConfig field, e.g. grad_accum_steps or profile_steps
    config = train.TrainConfig(**options)
    result = train.run(config, print_fn=None)
    per_epoch = [e["examples_per_sec"] for e in result["throughput"]][case["warmup_windows"]:]
    return {"rates": per_epoch, "replicas": result["replicas"], "precision": result["precision"],
            "jit_compile": result.get("jit_compile")}


def _measure_plain(case, tf_keras):
    """A hand-written fit, as a user would write it without tfpar."""
    import tensorflow as tf

    if tf_keras:
        import tf_keras as keras

        keras.mixed_precision.set_global_policy(case.get("precision", "float32"))
        model = keras.applications.ResNet50(weights=None, input_shape=(case["image"],) * 2 + (3,),
                                            classes=case["classes"])
    else:
        import keras

        from tfpar import models

        keras.mixed_precision.set_global_policy(case.get("precision", "float32"))
        model = models.build(case["model"], num_classes=case["classes"], input_shape=(case["image"],) * 2 + (3,))
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    timer = _window_timer(keras, case["batch"], case["warmup_windows"])
    model.fit(_synthetic(tf, case["batch"], case["image"], case["classes"]), verbose=0, callbacks=[timer],
              epochs=case["windows"] + case["warmup_windows"], steps_per_epoch=case["steps"])
    return {"rates": timer.rates, "params": int(model.count_params())}


# --------------------------------------------------------------------------- running cases

def _python_for(kind):
    if kind != "tf_keras":
        return sys.executable
    python = os.path.join(TF_KERAS_VENV, "bin", "python")
    if not os.path.exists(python):
        print(f"  making {TF_KERAS_VENV} with tf_keras (Keras 2) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", TF_KERAS_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "tensorflow==2.21.*", "tf-keras==2.21.*"], check=True)
    return python


def run_case(case, timeout=1200):
    """Measure ``case`` in a fresh process (or as 2 workers) and summarise its windows."""
    with tempfile.TemporaryDirectory() as tmp:
        case = dict(case, model_dir=os.path.join(tmp, "run"))
        argv = [_python_for(case["kind"]), os.path.abspath(__file__), "--_measure", json.dumps(case)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        if case.get("workers", 1) > 1:
            argv = [sys.executable, "-m", "tfpar.launcher", "--workers", str(case["workers"]), "--"] + argv
        started = time.time()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", f"timed out after {timeout} s"
        finally:
            if proc.poll() is None:  # a timeout or Ctrl-C: take the workers down too
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        lines = [l for l in stdout.splitlines() if "BENCHMARK_RESULT " in l]
        if proc.returncode != 0 or not lines:
            tail = "\n".join((stdout + stderr).splitlines()[-15:])
            return {"name": case["name"], "error": f"exit {proc.returncode}", "log_tail": tail}
    # Workers run in lock-step on the global batch, so any one of them (the first
    # to print) measures the job's rate.
    result = json.loads(lines[0].split("BENCHMARK_RESULT ", 1)[1])
    rates = result.pop("rates")
    out = {k: v for k, v in case.items() if k != "model_dir"}
    out.update(result)
    out.update(
        images_per_sec=statistics.median(rates), spread=[min(rates), max(rates)], windows_measured=len(rates),
        step_time_ms=1000.0 * case["batch"] / statistics.median(rates),
        wall_sec=round(time.time() - started, 1),
    )
    return out


def suites(name):
    """Comparisons: name -> (list of cases, how to read them)."""
    quick = name == "quick"
    w, s = (2, 4) if quick else (3, 8)
    base = dict(windows=w, warmup_windows=1, steps=s, classes=10)
    r18 = dict(base, model="resnet18", image=32, batch=32 if quick else 64)
    # ResNet-50 above 64 px so that both sides use the ImageNet stem (7x7/2 + max-pool).
    r50 = dict(base, model="resnet50", image=72 if quick else 128, batch=16 if quick else 32, classes=1000)
    r50w = dict(r50, batch=8 if quick else 16, steps=4 if quick else 6, pin=True, strategy="one_device")
    if name == "gpu":
        g = dict(base, model="resnet50", image=224, batch=256, classes=1000, steps=30)
        return {
            "gpu_xla": [dict(g, name="resnet50 fp16 one GPU", kind="tfpar", precision="mixed_float16", jit_compile="off"),
                        dict(g, name="resnet50 fp16+XLA one GPU", kind="tfpar", precision="mixed_float16", jit_compile="on")],
            "gpu_mirrored": [dict(g, name="resnet50 fp16+XLA mirrored", kind="tfpar", precision="mixed_float16",
                                  jit_compile="on", strategy="mirrored")],
        }
    return {
        "tfpar_vs_keras": [dict(r18, name="resnet18 plain Keras fit", kind="keras"),
                           dict(r18, name="resnet18 tfpar-train", kind="tfpar")],
        "keras3_vs_tf_keras": [dict(r50, name="resnet50 tf_keras (Keras 2)", kind="tf_keras"),
                               dict(r50, name="resnet50 tfpar (Keras 3)", kind="tfpar")],
        "scaling": [dict(r50w, name="resnet50 1 worker, 1 core", kind="tfpar"),
                    dict(r50w, name="resnet50 2 workers, 1 core each", kind="tfpar", workers=2, strategy="multi_worker",
                         batch=2 * r50w["batch"])],  # same per-worker batch
        "precision": [dict(r50, name="resnet50 float32", kind="tfpar"),
                      dict(r50, name="resnet50 mixed_bfloat16", kind="tfpar", precision="mixed_bfloat16")],
        "xla": [dict(r18, name="resnet18 mirrored x2, jit off", kind="tfpar", strategy="mirrored", virtual_cpus=2, jit_compile="off"),
                dict(r18, name="resnet18 mirrored x2, jit on", kind="tfpar", strategy="mirrored", virtual_cpus=2, jit_compile="on")],
    }


TARGETS = {"tfpar_vs_keras": 0.98, "keras3_vs_tf_keras": 1.0, "scaling": 0.9}


def ratio_of(name, measured):
    """second / first, per worker for scaling (efficiency)."""
    if len(measured) < 2 or any("error" in m for m in measured[:2]):
        return None
    first, second = measured[0]["images_per_sec"], measured[1]["images_per_sec"]
    if name == "scaling":
        return second / (measured[1].get("workers", 1) * first)
    return second / first


def machine():
    gpu = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu or None,
            "python": platform.python_version()}


def add_mfu(comparisons, info):
    """Model FLOPs utilisation for GPU ResNet-50 cases: achieved / peak training FLOP/s."""
    peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if info.get("gpu") and k in info["gpu"]), None)
    for cases in comparisons.values():
        for c in cases:
            if peak and c.get("model") == "resnet50" and "images_per_sec" in c:
                flops = 6 * RESNET50_MACS_224 * (c["image"] / 224) ** 2 * c["images_per_sec"]
                c["mfu"] = flops / (peak * 1e12 * max(1, c.get("replicas", 1)))


def markdown(report):
    lines = [f"# tfpar benchmark: {report['machine']['cpu']}" + (f" + {report['machine']['gpu']}" if report['machine']['gpu'] else ""),
             "", f"{report['date']}, suite `{report['suite']}`, TF {report['versions'].get('tensorflow')}, "
             f"Keras {report['versions'].get('keras')}. Median images/sec over timed windows (min-max in brackets).", "",
             "| comparison | configuration | images/sec | spread | ratio | target |", "|---|---|---:|---|---:|---:|"]
    for name, cases in report["comparisons"].items():
        ratio = report["ratios"].get(name)
        for i, c in enumerate(cases):
            if "error" in c:
                lines.append(f"| {name} | {c['name']} | error: {c['error']} | | | |")
                continue
            extra = f" (MFU {100 * c['mfu']:.1f}%)" if "mfu" in c else ""
            r = f"{ratio:.2f}" if (ratio is not None and i == len(cases) - 1) else ""
            t = f"{TARGETS[name]:.2f}" if (name in TARGETS and i == len(cases) - 1) else ""
            lines.append(f"| {name} | {c['name']} | {c['images_per_sec']:.1f}{extra} | {c['spread'][0]:.1f}-{c['spread'][1]:.1f} | {r} | {t} |")
    return "\n".join(lines) + "\n"


def chart(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [c for cases in report["comparisons"].values() for c in cases if "images_per_sec" in c]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1))
    ax.barh([c["name"] for c in rows], [c["images_per_sec"] for c in rows],
            xerr=[[c["images_per_sec"] - c["spread"][0] for c in rows], [c["spread"][1] - c["images_per_sec"] for c in rows]])
    ax.invert_yaxis()
    ax.set_xlabel("images/sec (median, min-max)")
    ax.set_title(f"tfpar benchmark, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("default", "quick", "gpu"), default="default",
                        help="default: the CPU comparisons; quick: a smoke run; gpu: ResNet-50 on GPUs.")
    parser.add_argument("--only", default="", help="Comma-separated comparisons to run (default: all of the suite).")
    parser.add_argument("--out", default=RESULTS, help="Directory for the JSON, markdown and PNG results.")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print("BENCHMARK_RESULT " + json.dumps(measure(json.loads(args._measure))), flush=True)
        return 0
    chosen = suites(args.suite)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in chosen]
    if unknown:
        parser.error(f"unknown comparison(s) {', '.join(unknown)}; suite {args.suite} has: {', '.join(chosen)}")
    import keras
    import tensorflow as tf

    info = machine()
    report = {"suite": args.suite, "date": datetime.date.today().isoformat(), "machine": info,
              "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}, "comparisons": {}, "ratios": {}}
    for name, cases in chosen.items():
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        measured = []
        for case in cases:
            result = run_case(case)
            measured.append(result)
            if "error" in result:
                print(f"  {case['name']}: FAILED ({result['error']})\n{result['log_tail']}", flush=True)
            else:
                print(f"  {case['name']}: {result['images_per_sec']:.1f} images/sec "
                      f"(min {result['spread'][0]:.1f}, max {result['spread'][1]:.1f}; {result['wall_sec']} s)", flush=True)
        report["comparisons"][name] = measured
        report["ratios"][name] = ratio_of(name, measured)
        if report["ratios"][name] is not None:
            target = f" (target {TARGETS[name]})" if name in TARGETS else ""
            print(f"  ratio: {report['ratios'][name]:.3f}{target}", flush=True)
    add_mfu(report["comparisons"], info)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{(info['gpu'] or 'cpu').replace(' ', '_')}-{info['cores']}core-{report['date']}")
    from tfpar.summary import write_json_atomic

    write_json_atomic(stem + ".json", report)
    with open(stem + ".md.tmp", "w") as f:
        f.write(markdown(report))
    os.replace(stem + ".md.tmp", stem + ".md")
    drew = chart(report, stem + ".png")
    print(markdown(report))
    print(f"wrote {stem}.json, {stem}.md" + (", .png" if drew else " (no chart: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
