"""What differs per strategy in a ``tfpar-train`` run: one hook class per strategy family.

``tfpar.run.driver`` runs every strategy through one skeleton (prepare -> build -> fit ->
evaluate -> summarize) and asks the run's hook, made fresh for each run, at each point where
strategies differ. ``base.Hook`` lists those points and their defaults; ``keras_fit`` covers
the tf.distribute strategies Keras ``fit`` drives, ``pipeline``, ``dtensor`` and
``parameter_server`` the rest. ``driver.HOOKS`` maps strategy names to them.
"""
