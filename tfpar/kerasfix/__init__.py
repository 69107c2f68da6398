"""Layer 3, Keras fixes: everything that patches Keras 3 (the multi-worker trainer, chief-only saving,
``fit``/``evaluate`` under ``ParameterServerStrategy``), each version-gated. Imports ``core`` and ``step``."""
