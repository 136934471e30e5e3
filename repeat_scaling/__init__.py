"""repeat_scaling: a JAX/Flax suite for scaling laws of repeated training data.

Data flows one way: data -> models -> train -> eval -> report. Only the data
preparation layer may import tensorflow / seqio / tfds, and only lazily.
"""

__version__ = "0.1.0"
