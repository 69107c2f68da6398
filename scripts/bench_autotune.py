"""The measuring side of two benchmark comparisons (``scripts/benchmark.py`` runs each case in its own process).

``--only autotune``: for keras.applications ResNet-50, a small keras-hub Gemma (built from a config,
nothing downloaded) and tfpar's ViT-S/16 (32 px, 4 px patches), tfpar's untuned default, every manual
setting of the space ``--autotune`` searches (the exhaustive sweep) and the autotuned run, each timed
the same way after its own warm-up.
``benchmark.py`` then adds autotuned / best manual and autotuned / default (``add_autotune_ratios``).

``--only keras3_jax_vs_tfpar``: the same two models with plain Keras 3 ``fit`` on the JAX backend, on
the TensorFlow backend, and through tfpar (its default settings), per-step medians of one ``fit`` with
the first steps left out. It needs ``jax`` (``pip install -e ".[bench]"`` adds ``jax[cpu]``); where
``import jax`` fails, ``benchmark.py`` prints one line and skips it.
"""

import importlib.util
import itertools
import os
import statistics
import time

SEQUENCE = 128
VOCABULARY = 4096
SKIP_STEPS = 2  # of each window: the first steps (tracing, compiling) are left out


NO_JAX = 'jax is not installed here (pip install -e ".[bench]" adds jax[cpu]).'


def jax_available():
    return importlib.util.find_spec("jax") is not None


def _windows(quick):
    """How every case of both comparisons is timed: 1 warm-up window, then 2 timed ones."""
    return dict(windows=2, warmup_windows=1, steps=4 if quick else 6)


def models(quick):
    """The two models of both comparisons, at sizes that fit a busy 2-core CPU."""
    base = _windows(quick)
    return {"resnet50": dict(base, model="resnet50", image=64, batch=8, classes=10),
            "gemma": dict(base, model="gemma", batch=16, layers=4, hidden=256)}


def autotune_models(quick):
    """The autotune comparison's models: both of ``models`` and tfpar's own ViT-S/16 (TensorFlow only)."""
    vit = dict(_windows(quick), model="vit_s16", image=32, patch=4, batch=16, classes=10)
    return {**models(quick), "vit_s16": vit}


def precisions(environ=os.environ):
    """The policies the autotune comparison sweeps: float32, and mixed_bfloat16 where tfpar's ``auto`` rule
    finds it fast (bfloat16 instructions, AMX or AVX512_BF16, reached through oneDNN).

    ``--precision=auto --autotune`` also times mixed_bfloat16 on CPUs without bfloat16 instructions, where
    the Gemma and ViT-S/16 ran at 0.35 of float32 without XLA and 0.95-0.97 of float32's best with it (a
    2-core AVX-512 Xeon, benchmarks/README.md): sweeping it there more than doubles the comparison's time
    to show a loss. ``TFPAR_BENCH_PRECISIONS`` (comma-separated) overrides the rule.
    """
    if environ.get("TFPAR_BENCH_PRECISIONS"):
        return environ["TFPAR_BENCH_PRECISIONS"].split(",")
    from tfpar.runtime import precision  # imports TensorFlow: only when a suite is chosen, not on import

    fast = precision.cpu_has_native_bf16() and precision.onednn_enabled(environ)
    return ["float32"] + (["mixed_bfloat16"] if fast else [])


def _space(case, policies=("float32",)):
    """The settings ``--autotune`` searches for this model on one device: precision (when more than float32
    is allowed), XLA, and micro-batches for models without BatchNormalization."""
    micro = [1] if case["model"] == "resnet50" else [1, 2, 4]
    return [{"precision": p, "xla": x, "bucket_mb": 25.0, "all_reduce_dtype": "float32", "micro_batches": m}
            for p, x, m in itertools.product(policies, (False, True), micro)]


def describe(setting, policies=("float32",)):
    """``XLA on, 2 micro-batch(es)``, with the policy when the sweep covers more than one."""
    text = f"XLA {'on' if setting.get('xla') else 'off'}, {setting.get('micro_batches')} micro-batch(es)"
    return text + (f", {setting.get('precision', 'float32')}" if len(policies) > 1 else "")


def autotune_cases(quick, policies=None):
    """Per model: tfpar's default, every setting of the search (the exhaustive sweep), and the autotuned run.

    With ``policies`` beyond float32 the autotuned run is ``--precision=auto``'s: a precision trial per
    policy, each on its own model, then the other settings on a model built under the choice.
    """
    policies = list(policies or precisions())
    cases = []
    for name, case in autotune_models(quick).items():
        case = dict(case, policies=policies)
        default = _space(case)[0]  # tfpar's rule on a CPU: float32, XLA off, one micro-batch
        cases.append(dict(case, name=f"{name} tfpar default (untuned)", kind="bench_setting", setting=default))
        for setting in _space(case, policies):
            cases.append(dict(case, name=f"{name} manual: {describe(setting, policies)}", kind="bench_setting",
                              setting=setting))
        cases.append(dict(case, name=f"{name} autotuned", kind="bench_autotuned"))
    return cases


def jax_cases(quick):
    cases = []
    for name, case in models(quick).items():
        cases += [dict(case, name=f"{name} Keras 3 on JAX", kind="bench_keras", backend="jax"),
                  dict(case, name=f"{name} Keras 3 on TF", kind="bench_keras", backend="tensorflow"),
                  dict(case, name=f"{name} tfpar (default settings)", kind="bench_setting",
                       setting=_space(case)[0])]
    return cases


def add_autotune_ratios(cases):
    """Per model: the autotuned case's images/sec over the best manual case's and over the default's.

    With rounds (A B A B: every case once per round), each ratio is the median of the per-round ratios, so a
    machine whose speed drifts by 10-15% between minutes (as this 2-core one does) moves both sides alike.
    ``same_as_best``: the autotuned choice is the best manual setting, so its ratio is noise around 1.
    ``choice_in_sweep``: the sweep's own rate for the chosen setting over the sweep's best: how good the
    choice is, free of the autotuned process's noise (one process differs from the next by up to 15% here).
    """
    for tuned in (c for c in cases if c.get("kind") == "bench_autotuned" and "error" not in c):
        same = [c for c in cases if c.get("model") == tuned["model"] and "error" not in c]
        manual = [c for c in same if " manual: " in c["name"]]
        default = next((c for c in same if c["name"].endswith("(untuned)")), None)
        if manual:
            best = max(manual, key=lambda c: c["images_per_sec"])
            tuned["ratio_to_best_manual"] = _paired(tuned, best)
            tuned["best_manual"] = best["name"]
            choice = (tuned.get("autotune") or {}).get("choice", {})
            tuned["same_as_best"] = bool(best.get("setting")) and _same(choice, best["setting"])
            chosen = [c for c in manual if c.get("setting") and _same(choice, c["setting"])]
            if chosen:
                tuned["choice_in_sweep"] = _paired(chosen[0], best)
        if default:
            tuned["ratio_to_default"] = _paired(tuned, default)
    return cases


def _same(choice, setting):
    keys = {"xla": None, "micro_batches": None, "precision": "float32"}  # with the value a missing key means
    return bool(choice) and all(choice.get(k, d) == setting.get(k, d) for k, d in keys.items())


def _paired(case, base):
    mine, theirs = case.get("round_rates"), base.get("round_rates")
    if mine and theirs and len(mine) == len(theirs):
        return statistics.median(a / b for a, b in zip(mine, theirs))
    return case["images_per_sec"] / base["images_per_sec"]


def lines(cases):
    """The autotune ratios as printed lines (none for other comparisons)."""
    out = []
    for c in cases:
        if "ratio_to_best_manual" in c or "ratio_to_default" in c:
            choice = (c.get("autotune") or {}).get("choice", {})
            out.append(f"{c['name']}: chose {describe(choice, c.get('policies', ('float32',)))} "
                       f"in {c['autotune']['tune_sec']:.0f} s; "
                       f"/ best manual ({c.get('best_manual')}) {c.get('ratio_to_best_manual', 0):.3f} "
                       f"(target 0.97{'; the same setting' if c.get('same_as_best') else ''}), "
                       f"/ untuned default {c.get('ratio_to_default', 0):.3f}"
                       + (f"; the sweep's own rate for the choice / its best {c['choice_in_sweep']:.3f}"
                          if "choice_in_sweep" in c else ""))
    return out


def markdown_lines(report):
    skipped = ["", *(f"Skipped: {line}" for line in report.get("skipped", []))] if report.get("skipped") else []
    found = lines(report["comparisons"].get("autotune", []))
    if not found:
        return skipped
    return skipped + ["", "Autotune (`--autotune`, `tfpar.run.autotune`): the autotuned run over the best setting of an "
            "exhaustive manual sweep (target 0.97) and over tfpar's untuned default:", ""] + [f"- {x}" for x in found]


# --------------------------------------------------------------------------- inside the case's process

def measure(case):
    if case["kind"] == "bench_keras":
        os.environ["KERAS_BACKEND"] = case["backend"]  # before Keras is imported in this fresh process
    import keras

    tuned, data = None, _data(case)  # one batch of its own generator (numpy seed 0), not Keras's seed
    if case["kind"] == "bench_autotuned":
        from tfpar.run import autotune

        started = time.perf_counter()
        policy, trials = "float32", []
        if len(case.get("policies", ())) > 1:  # --precision=auto: a model per policy, then the run's own
            policy, report = autotune.tune_precision(lambda name: _seeded(case, keras, name), lambda: data,
                                                     case["policies"], batch_size=case["batch"], cache=False)
            trials = report["trials"]
        model = _seeded(case, keras, policy)
        report = autotune.autotune(model, None, data, cache=False, print_fn=print)
        tuned = {"choice": {**report["choice"], "precision": policy}, "trials": trials + report["trials"],
                 "tune_sec": time.perf_counter() - started}
    else:
        model = _seeded(case, keras, (case.get("setting") or {}).get("precision", "float32"))
        if case["kind"] == "bench_setting":
            from tfpar.run import autotune

            autotune.install(model, case["setting"])
    rates = _fit_windows(keras, model, data, case)
    return {"rates": rates, "params": int(model.count_params()), **({"autotune": tuned} if tuned else {})}


def _seeded(case, keras, policy):
    """The case's model under ``policy``, from seed 0 like every other case."""
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    return _build(case, keras)


def _data(case):
    return _tokens(case) if case["model"] == "gemma" else _images(case)


def _build(case, keras):
    if case["model"] == "resnet50":
        model = keras.applications.ResNet50(weights=None, input_shape=(case["image"],) * 2 + (3,),
                                            classes=case["classes"])
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
        return model
    if case["model"] == "vit_s16":
        from tfpar import models as tfpar_models

        model = tfpar_models.build("vit_s16", num_classes=case["classes"], input_shape=(case["image"],) * 2 + (3,),
                                   patch_size=case["patch"])
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        return model
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY, num_layers=case["layers"], num_query_heads=4, num_key_value_heads=1,
        hidden_dim=case["hidden"], intermediate_dim=4 * case["hidden"], head_dim=case["hidden"] // 4)
    inputs = {"token_ids": keras.Input((SEQUENCE,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((SEQUENCE,), dtype="int32", name="padding_mask")}
    logits = backbone.token_embedding(backbone(inputs), reverse=True)
    model = keras.Model(inputs, logits)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _images(case):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(case["batch"], case["image"], case["image"], 3)).astype("float32")
    y = rng.integers(0, case["classes"], case["batch"]).astype("int32")
    return _repeat(x, y)


def _tokens(case):
    import numpy as np

    tokens = np.random.default_rng(0).integers(0, VOCABULARY, (case["batch"], SEQUENCE + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((case["batch"], SEQUENCE), "int32")}
    return _repeat(x, tokens[:, 1:])


def _repeat(x, y):
    """One batch, repeated: a tf.data pipeline on TensorFlow, a generator on JAX."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)

    def forever():
        while True:
            yield x, y

    return forever()


def _fit_windows(keras, model, data, case):
    """Examples/sec of each timed window (one epoch each), the first ``SKIP_STEPS`` steps left out."""
    rates, batch = [], case["batch"]

    class Windows(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.stamps = []

        def on_train_batch_end(self, step, logs=None):
            self.stamps.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            if epoch >= case["warmup_windows"] and len(self.stamps) > SKIP_STEPS:
                timed = self.stamps[SKIP_STEPS - 1:]
                rates.append((len(timed) - 1) * batch / (timed[-1] - timed[0]))

    model.fit(data, epochs=case["warmup_windows"] + case["windows"], steps_per_epoch=case["steps"], verbose=0,
              callbacks=[Windows()])
    return rates
