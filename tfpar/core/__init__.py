"""Layer 1, the bottom: device and strategy-kind facts, quiet start, the list of private Keras/TF hooks,
summary I/O, trace reading and the supported versions. Imports nothing else from tfpar."""
