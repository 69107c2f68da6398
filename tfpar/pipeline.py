"""Public API: ``tfpar.pipeline.split(model, stages, micro_batches)`` pipelines a Keras model (``tfpar.parallel.pipeline``)."""

from tfpar.parallel.pipeline import PipelineModel, Plan, plan_stages, split

__all__ = ["PipelineModel", "Plan", "plan_stages", "split"]
