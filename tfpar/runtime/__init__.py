"""Layer 4, the runtime: cluster discovery, the strategy factory, precision, the launcher and its servers,
and the fault layer (preemption, lost peers, backup and resume). Imports the layers below."""
