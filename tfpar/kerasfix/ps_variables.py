"""What Keras 3 lacks to train under ``ParameterServerStrategy``: partitioned weights and lost servers.

Keras 3's TF optimizer and ``GradientTape`` use cannot handle a weight
partitioned over several ps tasks (a ``ShardedVariable``);
``support_sharded_variables`` and the step plan's ``partitioned`` gradients
(``tfpar.step.pieces.gradients``) let ``tfpar.kerasfix.ps_fit`` train them.
``is_ps_failure``/``lost_ps_error`` turn a lost ps task into one clear error.
"""


class ParameterServerError(RuntimeError):
    """A parameter server was lost; the variables it held are gone."""


def shards(weight):
    """The ``tf.Variable`` pieces of a Keras weight: its shards when partitioned (``tfpar.step.pieces.shards``)."""
    from tfpar.step import pieces

    return pieces.shards(weight)


def support_sharded_variables(optimizer):
    """Let this Keras 3 optimizer update ``ShardedVariable`` weights.

    Keras's TF optimizer sends every update through
    ``strategy.extended.update``, which takes only plain resource variables
    ("You can not update `var`"). Under ParameterServerStrategy each worker
    step is a single replica, so a sharded weight can be updated in place:
    ``ShardedVariable.assign*`` split the new value over the shards. Plain
    variables keep Keras's path (the update runs on their PS task). Only this
    optimizer instance changes; calling this twice is harmless.
    """
    import tensorflow as tf

    sharded_type = tf.__internal__.distribute.ShardedVariable
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is None or "_distributed_tf_update_step" in vars(opt):
            continue  # wrapped already
        keras_update = opt._distributed_tf_update_step
        keras_decay = opt._apply_weight_decay

        def update(distribution, grads_and_vars, learning_rate, opt=opt, keras_update=keras_update):
            plain = []
            for grad, var in grads_and_vars:
                if isinstance(var, sharded_type):
                    opt.update_step(grad, var, learning_rate)
                else:
                    plain.append((grad, var))
            keras_update(distribution, plain, learning_rate)

        def decay(variables, opt=opt, keras_decay=keras_decay):
            plain = []
            for variable in variables:
                value = getattr(variable, "value", variable)
                if isinstance(value, sharded_type):
                    if opt.weight_decay is not None and opt._use_weight_decay(variable):
                        rate = tf.cast(opt.learning_rate, value.dtype) * tf.cast(opt.weight_decay, value.dtype)
                        value.assign_sub(tf.convert_to_tensor(value) * rate)
                else:
                    plain.append(variable)
            keras_decay(plain)

        opt._distributed_tf_update_step = update
        opt._apply_weight_decay = decay



def is_ps_failure(err):
    """Worker losses are retried by the coordinator; an unavailable task that reaches us is a PS."""
    import tensorflow as tf

    return isinstance(err, tf.errors.UnavailableError) or "/job:ps" in str(err)



def lost_ps_error(err, strategy, epoch, finished_steps, resume):
    """A ``ParameterServerError`` that names the lost task; ``resume`` says where a restart resumes."""
    text = str(err)
    resolver = strategy.cluster_resolver or getattr(strategy, "_cluster_resolver", None)
    addresses = resolver.cluster_spec().as_dict().get("ps", []) if resolver else []
    lost = [f"ps:{i} ({a})" for i, a in enumerate(addresses) if a in text or f"/job:ps/replica:0/task:{i}" in text]
    who = ", ".join(lost) or "a parameter server"
    return ParameterServerError(
        f"Lost {who} during epoch {epoch + 1} after {finished_steps} finished steps "
        f"({type(err).__name__}); its variables are gone, so training stopped. Restart the ps task(s) "
        f"and the chief (workers may stay up): {resume}."
    )
