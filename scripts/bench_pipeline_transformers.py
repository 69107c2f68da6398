"""The ``pipeline_transformers`` comparison of scripts/benchmark.py: a small keras-hub Gemma, tokens/sec.

One process (plain Keras ``fit``, one core; with the pipeline's 8 x 16
sequences per step, and with 16) against 2 worker processes of one core
each: 2 stages with GPipe and 1F1B, and 4 stages (2 a process, round-robin)
with interleaved 1F1B, all at M = 8 (tfpar.pipeline.split over the tasks of
the TF_CONFIG cluster that benchmark.py's launcher makes). Worker 0 drives
and traces 2 steps of the first timed window, asking worker 1 for its trace
of the same steps, for the bubble measured beside the theory; worker 1 only
serves its stage. A case's ``batch`` is tokens per step, so
benchmark.py's images/sec column reads tokens/sec.
"""

import os

VOCAB, LAYERS, HIDDEN, HEADS, HEAD_DIM, FFN = 1024, 4, 128, 4, 32, 512


def cases(quick):
    seq, sequences = (32, 8) if quick else (128, 16)
    one = dict(windows=1 if quick else 2, warmup_windows=1, steps=3 if quick else 4, pin=True,
               kind="hub_pipeline", seq=seq, sequences=sequences, batch=seq * sequences)
    two = dict(one, workers=2, micro_batches=8, sequences=8 * sequences, batch=8 * seq * sequences, steps=3)
    same = dict(one, sequences=8 * sequences, batch=8 * seq * sequences, steps=3)  # the pipeline's step, unsplit
    return [dict(same, name=f"gemma {LAYERS}x{HIDDEN} 1 process, 1 core, {8 * sequences} sequences per step"),
            dict(one, name=f"gemma 1 process, 1 core, {sequences} sequences per step"),
            dict(two, name=f"gemma 2 processes, 2 stages gpipe, 8 micro-batches of {sequences}", schedule="gpipe"),
            dict(two, name=f"gemma 2 processes, 2 stages 1f1b, 8 micro-batches of {sequences}", schedule="1f1b"),
            dict(two, name=f"gemma 2 processes, 4 stages (2 a process) interleaved_1f1b, 8 micro-batches of "
                 f"{sequences}", schedule="interleaved_1f1b", stages=4)]


def measure(case, window_timer, traced_steps):
    """Train the case's model on synthetic tokens; ``{"rates": tokens/sec per timed window}``."""
    import keras
    import keras_hub
    import tensorflow as tf

    devices = None
    if case.get("workers", 1) > 1:
        from tfpar.parallel.pipeline import tasks
        from tfpar.runtime import cluster, peers, server

        info = cluster.detect()
        if not info.is_chief:
            server.serve(info, until_gone=tasks.chief(info), line=tasks.announcement(info, 2), print_fn=None)
        peers.connect(info, 120, "the pipeline's stage tasks")
        devices = tasks.devices(info, 2)
    keras.utils.set_random_seed(0)
    seq = case["seq"]
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=VOCAB, num_layers=LAYERS, num_query_heads=HEADS,
                                              num_key_value_heads=1, hidden_dim=HIDDEN, intermediate_dim=FFN,
                                              head_dim=HEAD_DIM)
    inputs = {n: keras.Input((seq,), dtype="int32", name=n) for n in ("token_ids", "padding_mask")}
    model = keras.Model(inputs, keras.layers.Dense(VOCAB, name="lm_head")(backbone(inputs)), name="gemma_small")
    if devices:
        from tfpar.parallel import pipeline

        model = pipeline.split(model, stages=case.get("stages", 2), micro_batches=case["micro_batches"],
                               schedule=case["schedule"],
                               balance="flops", devices=devices, print_fn=None)
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    n = case["sequences"]
    x = {"token_ids": tf.random.stateless_uniform((n, seq), (0, 1), maxval=VOCAB, dtype=tf.int32),
         "padding_mask": tf.ones((n, seq), tf.int32)}
    y = tf.random.stateless_uniform((n, seq), (0, 2), maxval=VOCAB, dtype=tf.int32)
    data = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)
    timer = window_timer(keras, case["batch"], case["warmup_windows"])
    callbacks = [timer] + (_tracers(keras, case, info, traced_steps) if devices else [])
    model.fit(data, epochs=case["windows"] + case["warmup_windows"], steps_per_epoch=case["steps"], verbose=0,
              callbacks=callbacks)
    return {"rates": timer.rates, **(_bubble(case) if devices else {})}


def _tracers(keras, case, info, steps):
    """TensorBoard's profiler on the chief for ``steps``, and the same steps' trace of the stage task."""
    from tfpar.parallel.pipeline import tasks

    logdir = os.path.join(case["model_dir"], "trace")
    return [keras.callbacks.TensorBoard(logdir, profile_batch=steps),
            tasks.StageTrace(info, os.path.join(logdir, tasks.STAGE_TRACES), steps)]


def _bubble(case):
    """``bubble_measured`` from the traces (None without one) beside ``bubble_theory``."""
    from tfpar.parallel.pipeline import schedules, timeline

    stages, micro = case.get("stages", 2), case["micro_batches"]
    measured = timeline.read_run(os.path.join(case["model_dir"], "trace"), devices=2 if stages > 2 else None)
    return {"bubble_theory": round(schedules.bubble(stages, micro, 2), 4),
            "bubble_measured": measured["bubble"] if measured else None}
