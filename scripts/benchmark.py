#!/usr/bin/env python3
"""Images/sec side by side: tfpar vs plain Keras, vs tf_keras, 2 workers vs 1, bf16 vs fp32, XLA.

Every comparison is measured in one run as a ratio to its first case, each
case in its own fresh process (so device set-up, threads and memory never leak
between cases), on synthetic data of the model's size. A case reports the
median images/sec over several timed windows after warm-up, and the spread
(min, max) of those windows. A comparison with rounds runs its cases in turn
(A B A B) and takes the median of the per-round ratios, so slow drift of the
machine hits both sides. Results go to benchmarks/results/<machine>-<date>.json
and .md (and a PNG chart when matplotlib is installed: pip install -e ".[dev]").

  scripts/benchmark.py                 # the CPU suite (over 2 hours on 2 cores: use --only)
  scripts/benchmark.py --suite quick   # a smoke run of the same machinery
  scripts/benchmark.py --suite gpu     # ResNet-50 224px mixed_float16 + XLA, MFU, mirrored on all GPUs
  scripts/benchmark.py --only scaling --profile   # also trace 2 steps per case: compute, all-reduce, overlap ms
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts/bench_*.py measuring modules
import bench_interleaved  # noqa: E402  (scripts/: the interleaved 1F1B cases)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(REPO, "scripts") not in sys.path:  # the bench_*.py measuring files beside this one
    sys.path.append(os.path.join(REPO, "scripts"))
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


def traced_steps(case):
    """The 2 steps a pipeline case traces for its bubble: inside the first timed window, after its skipped step."""
    first = case["warmup_windows"] * case["steps"] + 2
    return first, first + 1


def _synthetic(tf, batch, size, classes, seed=0):
    images = tf.random.stateless_uniform((batch, size, size, 3), seed=(seed, 1))
    labels = tf.random.stateless_uniform((batch,), seed=(seed, 2), maxval=classes, dtype=tf.int32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)


def _pin_to_core():
    """One core per worker (its TF_CONFIG index, or a ceiling copy's number), one intra-op thread.

    Two inter-op threads, not one: with a single one TensorFlow's executor
    launches an all-reduce only once the backward pass's chain of ops is done,
    even when its gradients were ready long before, so nothing can overlap
    (traced: a collective with inputs ready at 0 ms started at 825 ms, after
    the last compute op; with two it started at 30 ms). Every case, one worker
    and ceiling included, runs with the same threads.
    """
    index = json.loads(os.environ.get("TF_CONFIG", '{"task": {"index": 0}}'))["task"]["index"]
    index = int(os.environ.get("TFPAR_BENCH_COPY", index))
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[index % len(cores)]})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)


import bench_autotune  # noqa: E402  (the autotune and Keras-on-JAX cases; imports no TensorFlow)


def measure(case):
    """Run one case in this process and return {'rates': [...], ...}."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "core" in case:  # a one-worker case on a chosen core (stragglers: the slowed core alone)
        os.environ["TFPAR_BENCH_COPY"] = str(case["core"])
    if case.get("pin"):
        _pin_to_core()
    if case.get("ps") and json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {}).get("type") != "chief":
        _serve_until_done(case)  # a pinned worker or ps server of an asynchronous case; prints no result
    kind = case["kind"]
    if kind == "elastic":  # a whole tfpar-launch run that shrinks from 2 workers to 1 (scripts/bench_elastic.py)
        import bench_elastic

        return bench_elastic.measure(case)
    if kind == "keras_distribution":  # keras.distribution on TF vs tfpar mirrored (scripts/bench_keras_distribution.py)
        import bench_keras_distribution

        return bench_keras_distribution.measure(case, _window_timer)
    if kind == "hub_pipeline":  # a keras-hub Gemma, pipelined across processes (scripts/bench_pipeline_transformers.py)
        import bench_pipeline_transformers

        return bench_pipeline_transformers.measure(case, _window_timer, traced_steps(case))
    if kind == "tfpar":
        return _measure_tfpar(case)
    if kind.startswith("bench_"):  # autotune, keras3_jax_vs_tfpar: scripts/bench_autotune.py
        return bench_autotune.measure(case)
    return _measure_plain(case, tf_keras=(kind == "tf_keras"))


def _measure_tfpar(case):
    """The tfpar-train path: TrainConfig -> train.run on synthetic data."""
    from tfpar.run import driver as train

    windows = case["windows"] + case["warmup_windows"]
    options = dict(
        model=case["model"], num_classes=case["classes"], image_size=case["image"],
        strategy=case.get("strategy", "one_device"), virtual_cpus=case.get("virtual_cpus"),
        precision=case.get("precision", "float32"), data="synthetic", batch_size=case["batch"],
        epochs=windows, steps_per_epoch=case["steps"], validation_steps=0, optimizer="sgd",
        learning_rate=0.01, model_dir=case["model_dir"], tensorboard=False, checkpoint_best=False, verbose=0,
        backup_freq="none",
        **({"jit_compile": case["jit_compile"]} if "jit_compile" in case else {}),
    )
    if case.get("profile_steps"):
        options.update(tensorboard=True, profile_steps="{},{}".format(*case["profile_steps"]))
    options.update(case.get("train_options", {}))  # any other TrainConfig field, e.g. all_reduce_dtype
    if case.get("pipeline_trace"):  # trace 2 steps of the first timed window: the bubble (tfpar.parallel.pipeline.timeline)
        options.update(tensorboard=True, profile_steps="{},{}".format(*traced_steps(case)))
    if case.get("virtual_gpus"):  # split one GPU into logical GPUs before TF starts (pipeline stages)
        import tensorflow as tf

        gpu = tf.config.list_physical_devices("GPU")[0]
        tf.config.set_logical_device_configuration(
            gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=case.get("gpu_memory_mb", 30000))]
            * case["virtual_gpus"])
    config = train.TrainConfig(**options)
    result = train.run(config, print_fn=None)
    epochs = result.get("throughput") or [{"examples_per_sec": r} for r in result.get("epoch_examples_per_sec", [])]
    per_epoch = [e["examples_per_sec"] for e in epochs][case["warmup_windows"]:]
    out = {"rates": per_epoch, "replicas": result["replicas"], "precision": result["precision"],
           "jit_compile": result.get("jit_compile")}
    out["train_loss"] = result.get("train_loss")
    if "worker_times" in result:  # stragglers: per-worker times, the shares reached, the warning
        out["worker_times"] = result["worker_times"]
    if result.get("staleness") is not None:
        out["staleness"] = result["staleness"]
    if "pipeline" in result:
        pipe = result["pipeline"]
        out.update(bubble_measured=pipe["bubble_measured"], bubble_theory=pipe["bubble_theory"],
                   stage_ms=[row["ms"] for row in pipe["stage_table"]])
    return out


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
    # The accuracy metric, as tfpar-train computes it (and as most users compile).
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = _window_timer(keras, case["batch"], case["warmup_windows"])
    callbacks = [timer]
    if case.get("profile_steps"):
        callbacks.append(keras.callbacks.TensorBoard(case["model_dir"], profile_batch=tuple(case["profile_steps"])))
    model.fit(_synthetic(tf, case["batch"], case["image"], case["classes"]), verbose=0, callbacks=callbacks,
              epochs=case["windows"] + case["warmup_windows"], steps_per_epoch=case["steps"])
    return {"rates": timer.rates, "params": int(model.count_params())}


# --------------------------------------------------------------------------- running cases

def _python_for(kind):
    """This interpreter, or for tf_keras the one of a separate virtualenv (made on first use)."""
    if kind != "tf_keras":
        return sys.executable
    python = os.path.join(TF_KERAS_VENV, "bin", "python")
    ready = os.path.join(TF_KERAS_VENV, ".tfpar-ready")  # written once every package below is in
    if not os.path.exists(ready):
        print(f"  making {TF_KERAS_VENV} with tf_keras (Keras 2) ...", flush=True)
        if not os.path.exists(python):
            subprocess.run([sys.executable, "-m", "venv", TF_KERAS_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "tensorflow==2.21.*", "tf-keras==2.21.*",
                        "tensorboard"], check=True)  # tensorboard: tf_keras's TensorBoard callback (--profile)
        open(ready, "w").close()
    return python


def run_case(case, timeout=1200, profile=False):
    """Measure ``case`` in a fresh process (or as 2 workers) and summarise its windows.

    ``profile`` also traces the last timed epoch's steps 3-4 from its end (on
    the chief) and adds ``profile``: ``tfpar.core.trace.step_breakdown`` of it.
    A ``ceiling`` case runs ``copies`` independent processes of the case at
    the same time, each on its own core, that never communicate: its rate is
    their sum, what the machine gives with every core busy and nothing sent.
    """
    with tempfile.TemporaryDirectory() as tmp:
        case = dict(case, model_dir=os.path.join(tmp, "run"))
        if profile:
            last = (case["windows"] + case["warmup_windows"]) * case["steps"]
            case["profile_steps"] = [last - 3, last - 2]
        copies = case.get("copies", 1)
        argv = [_python_for(case["kind"]), os.path.abspath(__file__), "--_measure"]
        if case.get("workers", 1) > 1:
            servers = ["--ps", str(case["ps"]), "--servers", "command"] if case.get("ps") else []  # pinned servers
            argv = [sys.executable, "-m", "tfpar.runtime.launcher", "--workers", str(case["workers"])] + servers + ["--"] + argv
        started = time.time()
        procs = []
        for copy in range(copies):
            own = dict(case, model_dir=case["model_dir"] + (f"-{copy}" if copy else ""))
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **({"TFPAR_BENCH_COPY": str(copy)} if copies > 1 else {}))
            procs.append(subprocess.Popen(argv + [json.dumps(own)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env, start_new_session=True))
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(1, timeout - (time.time() - started))))
            except subprocess.TimeoutExpired:
                outputs.append(("", f"timed out after {timeout} s"))
            finally:
                if proc.poll() is None:  # a timeout or Ctrl-C: take the workers down too
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        results = []
        for proc, (stdout, stderr) in zip(procs, outputs):
            lines = [l for l in stdout.splitlines() if "BENCHMARK_RESULT " in l]
            if proc.returncode != 0 or not lines:
                tail = "\n".join((stdout + stderr).splitlines()[-15:])
                return {"name": case["name"], "error": f"exit {proc.returncode}", "log_tail": tail}
            # Workers run in lock-step on the global batch, so any one of them (the first
            # to print) measures the job's rate.
            results.append(json.loads(lines[0].split("BENCHMARK_RESULT ", 1)[1]))
        breakdown = _profile_of(case["model_dir"]) if profile else None
    result = results[0]
    if copies > 1:  # window by window, the copies' rates add up
        result = dict(result, rates=[sum(r) for r in zip(*(r["rates"] for r in results))],
                      copy_rates=[r["rates"] for r in results])
    out = {k: v for k, v in case.items() if k != "model_dir"}
    out.update(result)
    out.update(summarise(result["rates"], examples_per_step(case)), wall_sec=round(time.time() - started, 1))
    if breakdown:
        out["profile"] = breakdown
    return out


def run_with_busy_core(case, **kwargs):
    """``run_case`` while a busy process spins on core ``case['busy_core']`` (a straggler's competitor); always killed."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[case["busy_core"] % len(cores)]
    spin = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    busy = subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
    try:
        return run_case(case, **kwargs)
    finally:
        os.killpg(busy.pid, signal.SIGKILL)
        busy.wait()


def _serve_until_done(case):
    """A worker or ps task of an asynchronous case: serve, pinned, until the launcher stops it (the chief is done)."""
    from tfpar.parallel import parameter_server

    parameter_server.serve()  # blocks; tfpar-launch stops servers once the chief has exited 0


def _profile_of(model_dir):
    from tfpar.core import trace

    paths = trace.find(model_dir)
    if not paths:
        return {"error": "no trace written"}
    try:
        return trace.step_breakdown(paths[0])  # the chief's (train/ sorts before workers/)
    except ValueError as err:
        return {"error": str(err)}


def examples_per_step(case):
    """Images one step of ``case`` trains on: its global batch times its micro-batches (times its ceiling copies)."""
    return case["batch"] * case.get("train_options", {}).get("grad_accum_steps", 1) * case.get("copies", 1)


def summarise(rates, examples):
    """Median images/sec of the timed windows, their min-max, and the median step time."""
    median = statistics.median(rates)
    return {"rates": rates, "images_per_sec": median, "spread": [min(rates), max(rates)],
            "windows_measured": len(rates), "step_time_ms": 1000.0 * examples / median}


def stragglers_cases(base, quick):
    """2 one-core workers, worker 1's core shared with a busy process the benchmark starts (``busy_core``).

    Cases: worker 0's core alone and worker 1's slowed core alone (their sum
    is the ideal), synchronous with ``--balance_batches`` (the target row:
    >= 0.9 of the ideal), synchronous plain, asynchronous parameter servers
    (1 ps; the same examples per window, one worker's batch per step; its
    loss and gradient staleness are reported), and 2 workers with no
    straggler as the reference. A small-width ResNet-18 keeps the step
    compute-bound, so what is measured is the wait for the slow worker.
    """
    one = dict(base, kind="tfpar", model="resnet18", image=32 if quick else 64, batch=16 if quick else 32, pin=True,
               strategy="one_device", steps=4 if quick else 8, warmup_windows=1,
               train_options={"width_multiplier": 0.25})
    two = dict(one, workers=2, strategy="multi_worker", batch=2 * one["batch"])
    balanced = dict(one["train_options"], balance_batches=True, balance_every=2 if quick else 4)
    slow = {"busy_core": 1}
    return [dict(one, name="resnet18/4 1 worker, core 0, alone", solo=True),
            dict(two, **slow, name="2 workers, worker 1 slowed, synchronous --balance_batches", train_options=balanced),
            dict(two, **slow, name="2 workers, worker 1 slowed, synchronous"),
            dict(one, **slow, name="2 workers, worker 1 slowed, asynchronous parameter servers", workers=2, ps=1,
                 strategy="parameter_server", steps=2 * one["steps"]),
            dict(two, name="2 workers, no straggler (reference)"),
            dict(one, **slow, core=1, name="resnet18/4 1 worker, core 1 shared with the busy process, alone",
                 solo=True)]


def suites(name):
    """Comparisons: name -> (list of cases, how to read them)."""
    import bench_keras_distribution
    quick = name == "quick"
    w, s = (2, 4) if quick else (3, 8)
    base = dict(windows=w, warmup_windows=1, steps=s, classes=10)
    r18 = dict(base, model="resnet18", image=32, batch=32 if quick else 64)
    # ResNet-50 above 64 px so that both sides use the ImageNet stem (7x7/2 + max-pool).
    r50 = dict(base, model="resnet50", image=72 if quick else 128, batch=16 if quick else 32, classes=1000)
    r50w = dict(r50, batch=8 if quick else 16, steps=4 if quick else 6, pin=True, strategy="one_device")
    # One all-reduce per 4 micro-batches (tfpar.step.steps). Steps take ~8 s, so the 2 steps each window leaves
    # out already cover tracing and warm-up; no warm-up window.
    accum = {"grad_accum_steps": 2 if quick else 4}
    r50a = dict(r50w, steps=3, warmup_windows=0, train_options=accum)
    def pipelined(case, micro, schedule="gpipe"):
        return dict(case, name=f"{case['model']} 2 stages, {schedule}, {micro} micro-batches", kind="tfpar",
                    strategy="pipeline", pipeline_trace=True,
                    train_options={"stages": 2, "micro_batches": micro, "schedule": schedule, "balance": "time"})

    if name == "gpu":
        g = dict(base, model="resnet50", image=224, batch=256, classes=1000, steps=30)
        gp = dict(g, batch=128, steps=10, precision="mixed_float16", jit_compile="off")
        return {
            "gpu_pipeline": [dict(gp, name="resnet50 fp16 one GPU", kind="tfpar"),
                             dict(pipelined(gp, 4), virtual_gpus=2), dict(pipelined(gp, 8), virtual_gpus=2)],
            "gpu_xla": [dict(g, name="resnet50 fp16 one GPU", kind="tfpar", precision="mixed_float16", jit_compile="off"),
                        dict(g, name="resnet50 fp16+XLA one GPU", kind="tfpar", precision="mixed_float16", jit_compile="on")],
            # On all visible GPUs: tfpar's default gradient buckets, then Keras's single all-reduce.
            "gpu_mirrored": [dict(g, name="resnet50 fp16+XLA mirrored", kind="tfpar", precision="mixed_float16",
                                  jit_compile="on", strategy="mirrored"),
                             dict(g, name="resnet50 fp16+XLA mirrored, Keras's single all-reduce", kind="tfpar",
                                  precision="mixed_float16", jit_compile="on", strategy="mirrored",
                                  train_options={"all_reduce_bucket_mb": 0}),
                             dict(g, name="resnet50 fp16 mirrored (no XLA: buckets overlap the backward)",
                                  kind="tfpar", precision="mixed_float16", jit_compile="off", strategy="mirrored")],
        }
    return {
        "tfpar_vs_keras": [dict(r18, name="resnet18 plain Keras fit", kind="keras"),
                           dict(r18, name="resnet18 tfpar-train", kind="tfpar")],
        "keras3_vs_tf_keras": [dict(r50, name="resnet50 tf_keras (Keras 2)", kind="tf_keras"),
                               dict(r50, name="resnet50 tfpar (Keras 3)", kind="tfpar")],
        # Same per-worker batch on 2 workers; tfpar's default all-reduce buckets, then Keras's single batch,
        # then the ceiling: the 1-worker case twice at once, one core each, nothing sent.
        "scaling_plain": [dict(r50w, name="resnet50 1 worker, 1 core", kind="tfpar"),
                          dict(r50w, name="resnet50 2 workers, 1 core each, float32 buckets", kind="tfpar", workers=2,
                               strategy="multi_worker", batch=2 * r50w["batch"]),
                          dict(r50w, name="resnet50 2 workers, 1 core each, Keras's single all-reduce", kind="tfpar",
                               workers=2, strategy="multi_worker", batch=2 * r50w["batch"],
                               train_options={"all_reduce_bucket_mb": 0}),
                          dict(r50w, name="resnet50 ceiling: 1 worker twice at once, no communication", kind="tfpar",
                               copies=2, ceiling=True)],
        "scaling": [dict(r50a, name=f"resnet50 1 worker, 1 core, {accum['grad_accum_steps']} micro-batches",
                         kind="tfpar"),
                    dict(r50a, name=f"resnet50 2 workers, {accum['grad_accum_steps']} micro-batches, bf16 all-reduce",
                         kind="tfpar", workers=2, strategy="multi_worker", batch=2 * r50a["batch"],
                         train_options=dict(accum, all_reduce_dtype="bfloat16")),
                    dict(r50a, name=f"resnet50 ceiling: {accum['grad_accum_steps']} micro-batches twice at once",
                         kind="tfpar", copies=2, ceiling=True)],
        # Bubble from the trace vs (S-1)/(M+S-1); images/sec of 2 stages on 2 logical CPUs vs 1 device.
        "pipeline": [dict(r18, name="resnet18 1 device", kind="tfpar", strategy="one_device"),
                     dict(pipelined(r18, 4), virtual_cpus=2), dict(pipelined(r18, 8), virtual_cpus=2)]
        + bench_interleaved.one_process(r18),
        # 1F1B and interleaved 1F1B (2 stages a process) at the same M on 2 one-core processes.
        "pipeline_interleaved_processes": bench_interleaved.two_processes(quick),
        # One stage per process vs data parallel on the same 2 one-core processes and global batch:
        # the pipeline sends activations at one cut; data parallel all-reduces every gradient (ratios per process).
        "pipeline_vs_data_parallel": [c for model in ("vgg16_bn", "resnet50") for c in _stage_vs_data(model, quick)],
        "pipeline_transformers": _transformer_cases(quick),
        # ViT-S/16 (32 px, 4 px patches: 64 tokens) on 2 one-core processes: data parallel, GPipe, 1F1B,
        # interleaved 1F1B at the same M, against 1 process; the bubble of each schedule from a trace.
        "pipeline_vit": bench_interleaved.two_processes(quick, model="vit_s16", batch=4 if quick else 8,
                                                        train_options={"patch_size": 4},
                                                        schedules=("gpipe", "1f1b"), data_parallel=True),
        "stragglers": stragglers_cases(base, quick),
        "precision": [dict(r50, name="resnet50 float32", kind="tfpar"),
                      dict(r50, name="resnet50 mixed_bfloat16", kind="tfpar", precision="mixed_bfloat16")],
        # 2 workers, worker 1 killed for good at step 12: images/sec after the shrink to 1 worker (before it and
        # the seconds lost in the case's fields).
        "elastic": [dict(r18, name="resnet18/4 2 workers -> 1 after a shrink", kind="elastic", batch=32,
                         epochs=4, steps=6, kill_at=12, backup_every=4, train_options={"width_multiplier": 0.25})],
        "keras_distribution": bench_keras_distribution.cases(base),
        "xla": [dict(r18, name="resnet18 mirrored x2, jit off", kind="tfpar", strategy="mirrored", virtual_cpus=2,
                     jit_compile="off", windows=2),
                dict(r18, name="resnet18 mirrored x2, jit on", kind="tfpar", strategy="mirrored", virtual_cpus=2,
                     jit_compile="on", windows=2)],
        # keras.applications ResNet-50 and a small keras-hub Gemma (scripts/bench_autotune.py)
        "autotune": bench_autotune.autotune_cases(quick),
        "keras3_jax_vs_tfpar": bench_autotune.jax_cases(quick),
    }


def _transformer_cases(quick):
    import bench_pipeline_transformers  # tokens/sec of a small keras-hub Gemma, 1 process vs 2 stages

    return bench_pipeline_transformers.cases(quick)


def _stage_vs_data(model, quick):
    """1 process; 2-process data parallel (plain; accumulation + bf16 all-reduce); 2 stages, M=8, on 2 processes.

    Data parallel keeps the 1-process batch per worker; the pipeline runs 8
    micro-batches of that batch per step, so every case's kernels see the same batch.
    """
    image = 32 if quick else 72  # above 64 px: the ImageNet stems (VGG16's 4096-wide dense layers)
    one = dict(windows=1 if quick else 2, warmup_windows=1, steps=3 if quick else 4, classes=10 if quick else 1000,
               model=model, image=image, batch=8 if quick else 16, pin=True, strategy="one_device", kind="tfpar",
               train_options={"width_multiplier": 0.25} if quick else {})
    two = dict(one, workers=2, batch=2 * one["batch"])
    opts = one["train_options"]
    return [dict(one, name=f"{model} 1 process, 1 core"),
            dict(two, name=f"{model} 2 processes data parallel", strategy="multi_worker"),
            dict(two, name=f"{model} 2 processes data parallel, 2 micro-batches, bf16 all-reduce",
                 strategy="multi_worker", train_options=dict(opts, grad_accum_steps=2, all_reduce_dtype="bfloat16")),
            # Micro-batches of the 1-process batch: 8 of 4 images ran at 0.54 per process against 0.78 with 8 of 16
            # (2026-12-02), as CPU kernels and each cut's transfer cost about as much for 4 images as for 16.
            dict(one, workers=2, batch=8 * one["batch"], steps=3, pipeline_trace=True,
                 name=f"{model} 2 processes, 2 stages, 8 micro-batches of {one['batch']}", strategy="pipeline",
                 train_options=dict(opts, stages=2, micro_batches=8, schedule="1f1b", balance="time"))]


TARGETS = {"tfpar_vs_keras": 0.98, "keras3_vs_tf_keras": 1.0, "scaling_plain": 0.75, "scaling": 0.9}
CEILING_TARGETS = {"scaling": 0.95, "stragglers": 0.9}  # of the machine's own ceiling (two copies that never
# communicate; for stragglers the ideal: the two workers' solo speeds added, add_ideal_ratios)
# Small differences on a noisy VM: A B A B, the median of the per-round ratios (0.82-1.02 in single runs).
ROUNDS = {"tfpar_vs_keras": 2, "keras3_vs_tf_keras": 2, "autotune": 3}


def ratio(case, baseline):
    """``case`` / ``baseline`` images/sec, per worker when ``case`` runs on several (scaling efficiency)."""
    if "error" in case or "error" in baseline:
        return None
    return case["images_per_sec"] / (case.get("workers", case.get("copies", 1)) * baseline["images_per_sec"])


def add_ceiling_ratios(cases):
    """Each multi-worker case's images/sec over its comparison's ``ceiling`` case (``ratio_to_ceiling``)."""
    ceiling = next((c for c in cases if c.get("ceiling") and "error" not in c), None)
    for c in cases:
        if ceiling is not None and c.get("workers", 1) > 1 and "error" not in c:
            c["ratio_to_ceiling"] = c["images_per_sec"] / ceiling["images_per_sec"]
    return cases


def _baseline(case, cases):
    """The case ``case`` is a ratio to: the comparison's first case of the same model (several models in one)."""
    return next((c for c in cases if c.get("model") == case.get("model")), cases[0])


def _is_baseline(case, cases):
    return _baseline(case, cases).get("name") == case.get("name")


def straggler_line(result):
    """'loss 0.594, staleness 0.67, shares [22, 10], warning: ...' for one stragglers case."""
    times = result.get("worker_times") or {}
    parts = [f"loss {result['train_loss']:.3f}" if result.get("train_loss") is not None else None,
             f"staleness {result['staleness']:.2f}" if result.get("staleness") is not None else None,
             f"shares {times['shares']}" if times.get("balance_batches") else None,
             f"own step ms {[round(w['step_ms']) for w in times.get('workers', [])]}" if times.get("workers") else None,
             "warned" if times.get("straggler_warning") else None]
    return ", ".join(p for p in parts if p)


def add_ideal_ratios(cases):
    """Stragglers: each multi-worker case's images/sec over the ideal, the sum of its ``solo`` cases' speeds.

    The ideal is what two workers of those speeds give when neither waits for
    the other; it is reported as ``ratio_to_ceiling`` (the "of ceiling" column).
    """
    solos = [c for c in cases if c.get("solo")]
    if len(solos) < 2 or any("error" in c for c in solos):
        return cases
    ideal = sum(c["images_per_sec"] for c in solos)
    for c in cases:
        if c.get("workers", 1) > 1 and "error" not in c:
            c["ratio_to_ceiling"] = c["images_per_sec"] / ideal
            c["ideal_images_per_sec"] = ideal
    return cases


def merge_rounds(rounds):
    """One comparison measured ``len(rounds)`` times -> its cases, each with a ``ratio`` to the first.

    Rates of a case are pooled over the rounds; its ratio is the median of the
    per-round ratios (``ratio_spread`` their min-max), so that a machine which
    drifts between rounds moves both sides.
    """
    merged = []
    for i, runs in enumerate(zip(*rounds)):
        if any("error" in r for r in runs):
            merged.append(next(r for r in runs if "error" in r))
            continue
        case = dict(runs[0], **summarise([x for r in runs for x in r["rates"]], examples_per_step(runs[0])),
                    wall_sec=round(sum(r["wall_sec"] for r in runs), 1), rounds=len(runs))
        if len(runs) > 1:  # each round's own images/sec, for ratios taken round by round (autotune)
            case["round_rates"] = [statistics.median(r["rates"]) for r in runs]
        if len(runs) > 1 and all("profile" in r for r in runs):
            case["profile_rounds"] = [r["profile"] for r in runs]
        if not _is_baseline(runs[0], rounds[0]):
            per_round = [ratio(r, _baseline(r, base)) for r, base in zip(runs, rounds)]
            if None not in per_round:
                case.update(ratio=statistics.median(per_round), ratio_spread=[min(per_round), max(per_round)])
        merged.append(case)
    return merged


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
             f"Keras {report['versions'].get('keras')}. Median images/sec over timed windows (min-max in brackets); "
             "ratio to the comparison's first case (per worker for several workers; over rounds, the median "
             "of the per-round ratios).", "",
             "The ceiling case runs the 1-worker case twice at the same time, one core each, with no "
             "communication; \"of ceiling\" is a multi-worker case's images/sec over the ceiling's.", "",
             "| comparison | configuration | images/sec | spread | ratio | target | of ceiling | target |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    profiled = []
    for name, cases in report["comparisons"].items():
        for i, c in enumerate(cases):
            if "error" in c:
                lines.append(f"| {name} | {c['name']} | error: {c['error']} | | | |")
                continue
            extra = f" (MFU {100 * c['mfu']:.1f}%)" if "mfu" in c else ""
            r = f"{c['ratio']:.2f}" if c.get("ratio") is not None else ""
            if c.get("rounds", 1) > 1 and c.get("ratio_spread"):
                r += f" ({c['ratio_spread'][0]:.2f}-{c['ratio_spread'][1]:.2f}, {c['rounds']} rounds)"
            t = f"{TARGETS[name]:.2f}" if (name in TARGETS and i == 1) else ""
            of = f"{c['ratio_to_ceiling']:.2f}" if c.get("ratio_to_ceiling") is not None else ""
            ot = f"{CEILING_TARGETS[name]:.2f}" if (name in CEILING_TARGETS and i == 1) else ""
            lines.append(f"| {name} | {c['name']} | {c['images_per_sec']:.1f}{extra} | "
                         f"{c['spread'][0]:.1f}-{c['spread'][1]:.1f} | {r} | {t} | {of} | {ot} |")
            for k, p in enumerate(c.get("profile_rounds") or [c.get("profile", {})]):
                if "step_ms" in p:
                    profiled.append((name, c["name"] + (f" (round {k + 1})" if c.get("profile_rounds") else ""), p))
    lines += bench_autotune.markdown_lines(report)
    stragglers = [c for c in report["comparisons"].get("stragglers", []) if "error" not in c]
    if stragglers:
        lines += ["", "Stragglers: \"of ceiling\" is of the ideal (the two solo speeds added); the loss is the last "
                  "window's training loss after the same number of examples; staleness: updates applied between a "
                  "gradient's weights being read and its own update (asynchronous only).", "",
                  "| configuration | images/sec | of ideal | loss | staleness | shares (worker 0, 1) |",
                  "|---|---:|---:|---:|---:|---|"]
        for c in stragglers:
            of = f"{c['ratio_to_ceiling']:.2f}" if c.get("ratio_to_ceiling") is not None else ""
            loss = f"{c['train_loss']:.3f}" if c.get("train_loss") is not None else ""
            stale = f"{c['staleness']:.2f}" if c.get("staleness") is not None else ""
            shares = ", ".join(map(str, (c.get("worker_times") or {}).get("shares") or []))
            lines.append(f"| {c['name']} | {c['images_per_sec']:.1f} | {of} | {loss} | {stale} | {shares} |")
    bubbles = [(name, c) for name, cases in report["comparisons"].items() for c in cases
               if c.get("bubble_theory") is not None]
    if bubbles:
        lines += ["", "Pipeline bubble: the idle share of a step, measured from a 2-step trace "
                  "(`tfpar.parallel.pipeline.timeline`) beside the theory (D-1)/(VM+D-1) for equal stages, "
                  "V stages on each of D devices ((S-1)/(M+S-1) with one stage a device):", "",
                  "| comparison | configuration | bubble measured | theory | stage ms (fwd+bwd, 1 micro-batch) |",
                  "|---|---|---:|---:|---|"]
        for name, c in bubbles:
            measured = f"{c['bubble_measured']:.2f}" if c.get("bubble_measured") is not None else "no trace"
            stage_ms = ", ".join(f"{ms:.0f}" for ms in c.get("stage_ms") or [] if ms is not None)
            lines.append(f"| {name} | {c['name']} | {measured} | {c['bubble_theory']:.2f} | {stage_ms} |")
    if profiled:
        lines += ["", "Where a step's time goes (`--profile`: a trace of 2 steps on the chief, `tfpar.core.trace`; "
                  "ms per step):", "",
                  "| comparison | configuration | step | compute | exposed | all-reduce busy | overlap |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, label, p in profiled:
            lines.append(f"| {name} | {label} | {p['step_ms']:.0f} | {p['compute_ms']:.0f} | {p['exposed_ms']:.0f} "
                         f"| {p['all_reduce_ms']:.0f} | {p['overlap_ms']:.0f} |")
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
    parser.add_argument("--profile", action="store_true",
                        help="Also trace 2 steps of each case (on the chief) and report where the step time goes.")
    parser.add_argument("--rounds", type=int, default=None,
                        help="Run each comparison's cases this many times in turn (A B A B) instead of its "
                             f"own count ({', '.join(f'{k}: {v}' for k, v in ROUNDS.items())}; others 1).")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be 1 or more, not {args.rounds}.")
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
    report = {"suite": args.suite, "date": datetime.date.today().isoformat(), "machine": info, "profiled": args.profile,
              "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}, "comparisons": {}, "ratios": {}}
    done = {}  # the same configuration in two comparisons is measured once
    for name, cases in chosen.items():
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        if name == "keras3_jax_vs_tfpar" and not bench_autotune.jax_available():
            report.setdefault("skipped", []).append(f"{name}: {bench_autotune.NO_JAX}")
            print(f"  skipped: {bench_autotune.NO_JAX}", flush=True)
            continue
        rounds, count = [], args.rounds or ROUNDS.get(name, 1)
        for round_index in range(count):
            measured = []
            for case in cases:
                key = json.dumps({k: v for k, v in case.items() if k != "name"}, sort_keys=True)
                if key in done and count == 1:
                    result = dict(done[key], name=case["name"], reused=True)
                else:
                    result = (run_with_busy_core if "busy_core" in case else run_case)(case, profile=args.profile)
                    done[key] = result
                measured.append(result)
                label = f"  {case['name']}" + (f" (round {round_index + 1})" if count > 1 else "")
                if "error" in result:
                    print(f"{label}: FAILED ({result['error']})\n{result['log_tail']}", flush=True)
                else:
                    print(f"{label}: {result['images_per_sec']:.1f} images/sec (min {result['spread'][0]:.1f}, "
                          f"max {result['spread'][1]:.1f}; " + ("measured above)" if result.get("reused") else
                                                                f"{result['wall_sec']} s)"), flush=True)
                    if name == "stragglers":
                        print(f"    {straggler_line(result)}", flush=True)
                    if "step_ms" in result.get("profile", {}):
                        from tfpar.core import trace

                        print(f"    profile: {trace.describe(result['profile'])}", flush=True)
            rounds.append(measured)
        merged = bench_autotune.add_autotune_ratios(add_ideal_ratios(add_ceiling_ratios(merge_rounds(rounds))))
        for line in bench_autotune.lines(merged):
            print("  " + line, flush=True)
        report["comparisons"][name] = merged
        report["ratios"][name] = merged[1].get("ratio") if len(merged) > 1 else None
        for c in merged[1:]:
            if c.get("ratio") is not None:
                target = f" (target {TARGETS[name]})" if (name in TARGETS and c is merged[1]) else ""
                print(f"  ratio {c['name']}: {c['ratio']:.3f}{target}", flush=True)
            if c.get("ratio_to_ceiling") is not None:
                target = f" (target {CEILING_TARGETS[name]})" if (name in CEILING_TARGETS and c is merged[1]) else ""
                print(f"  of the ceiling {c['name']}: {c['ratio_to_ceiling']:.3f}{target}", flush=True)
    add_mfu(report["comparisons"], info)
    os.makedirs(args.out, exist_ok=True)
    # One file per --only selection, so running one comparison does not overwrite the day's full run.
    suffix = "".join(f"-{n.replace('_', '-')}" for n in only)
    stem = os.path.join(args.out,
                        f"{(info['gpu'] or 'cpu').replace(' ', '_')}-{info['cores']}core-{report['date']}{suffix}")
    from tfpar.core.summary import write_json_atomic

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
