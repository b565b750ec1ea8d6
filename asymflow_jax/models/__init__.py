"""Models: the JiT backbone and the AsymJiT wrapper."""

from asymflow_jax.models.jit_model import (
    JiT,
    JiTConfig,
    PRESET_NAMES,
    abstract_params,
    jit_config,
    param_count,
    param_specs,
)
from asymflow_jax.models.asymjit import (
    apply_projected_init,
    asymjit_apply,
    init_params,
    projected_init_gain,
    zero_basis,
)

__all__ = [
    "JiT", "JiTConfig", "PRESET_NAMES", "abstract_params", "jit_config", "param_count", "param_specs",
    "apply_projected_init", "asymjit_apply", "init_params", "projected_init_gain", "zero_basis",
]
