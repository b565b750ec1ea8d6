"""asymflow_jax: Asymmetric Flow Models in JAX/Flax.

Import graph flows one way: ``asymflow`` (math) -> ``subspace`` (tools) -> models -> train/sample.
"""

__version__ = "0.1.0"
