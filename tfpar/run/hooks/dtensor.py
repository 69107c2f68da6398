"""``DTensor``: ``--strategy=dtensor``, Keras ``fit`` on a DTensor mesh.

The model is built and compiled in ``tfpar.parallel.sharding.layout_scope`` and trained by
Keras ``fit``; the summary adds the mesh and the parameter bytes each device holds. Default
layout rules adapt to the mesh (and say how); rules from ``--layout_rules`` are strict.
"""

import contextlib

from tfpar.parallel.sharding.meshes import dtensor_env_from_cluster
from tfpar.run.hooks.base import Hook


class DTensor(Hook):
    takes_callbacks = False  # its own loop, as far as users' callbacks go
    # compile as Keras decides (no jit_compile argument)

    def __init__(self, config, info, print_fn=print):
        super().__init__(config, info, print_fn)
        self.mesh_shape = self.rules = self.mesh = self.layouts = None
        self.rows = self.totals = None

    def check(self):
        """The mesh and layout rules, parsed before TF starts: user mistakes first."""
        from tfpar.parallel.sharding import meshes, rules as rules_lib

        self.mesh_shape = meshes.parse(self._mesh_spec())
        if self.config.layout_map and not self.config.layout_map.endswith(".json"):
            from tfpar.parallel.sharding import keras_distribution

            self.rules = keras_distribution.layout_map_from(self.config.layout_map, self.mesh_shape)
        elif self.config.layout_rules or self.config.layout_map:
            self.rules = rules_lib.load(self.config.layout_rules or self.config.layout_map)
        else:
            self.rules = rules_lib.default_rules(self.config.model)
        self.replicas = next(iter(self.mesh_shape.values()))  # the first axis carries the batch
        self.global_batch()  # a batch that does not split over the batch axis: one sentence now

    def _mesh_spec(self):
        if self.config.mesh:
            return self.config.mesh
        from tfpar.core import devices

        if self.config.virtual_cpus:
            devices.configure_virtual_cpus(self.config.virtual_cpus)
        return f"batch={len(devices.local_devices())}"

    def connect(self):
        from tfpar.parallel.sharding import meshes

        dtensor_env_from_cluster(self.info)
        self.mesh = meshes.mesh(self.mesh_shape, virtual_cpus=self.config.virtual_cpus)

    # Every client reads the same global batches and packs its own devices' slices: ``reading`` stays {}.

    @contextlib.contextmanager
    def scope(self):
        from tfpar.parallel.sharding import report, variables
        from tfpar.run import recipe

        report.plan(lambda: recipe.build_model(self.config), self.rules, self.mesh_shape)  # rule errors: one sentence
        with variables.layout_scope(self.mesh, self.rules, batch_axis=next(iter(self.mesh_shape))) as self.layouts:
            yield

    def compiled(self, model):
        model.optimizer.build(model.trainable_variables)  # slots now, inside the scope, so they are laid out

    def install(self, model, global_batch):
        from tfpar.parallel.sharding import layers, report

        layers.adapt_layers(model, self.layouts)
        self.rows = report.from_layouts(model, self.layouts)
        self.totals = report.totals(self.rows)

    def name(self):
        return f"DTensor {','.join(f'{k}={v}' for k, v in self.mesh_shape.items())}"

    def strategy_class(self):
        return "tf.experimental.dtensor.Mesh"

    def start_lines(self, global_batch, policy, peak, pipes):
        from tfpar.parallel.sharding import report

        rows, totals = self.rows, self.totals
        return [*report.adaptations(rows),
                f"{self.name()}: global batch {global_batch}, "
                f"precision {policy}, {sum(1 for r in rows if any(r['spec']))} of {len(rows)} weights sharded, "
                f"parameters {totals['param_bytes_per_device'] / 2**20:.2f} of {totals['param_bytes'] / 2**20:.2f} "
                f"MiB per device, {pipes.steps_per_epoch} steps/epoch"]

    def optimizer_updates(self, model):
        from tfpar.parallel.sharding import variables

        return int(variables.host_value(model.optimizer.iterations))

    def weights_sha256(self, model):
        from tfpar.core import summary

        return summary.arrays_checksum(model.get_weights())

    def summary(self, model, history, pipes):
        from tfpar.parallel.sharding import rules as rules_lib

        return {
            **super().summary(model, history, pipes),
            "throughput_per_epoch": self.throughput.epochs,
            "mesh": self.mesh_shape,
            "layout_rules": [[r.pattern, list(s)] for r, s in rules_lib.normalize(self.rules)],
            **self.totals,
        }

