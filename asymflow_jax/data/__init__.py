"""Input pipelines (grain) and image sources for asymflow_jax.

Quick start::

    from asymflow_jax import data
    pipe = data.make_pipeline(data.default_data_config(), seed=0,
                              global_batch_size=128)
    it = iter(pipe)
    batch = next(it)          # {"image": f32[B,32,32,1] in [-1,1], "label": i32[B]}
    state = it.get_state()    # save with the checkpoint; it.set_state(state) restores
"""

from asymflow_jax.data.pipeline import (
    BadRecordCounter,
    Pipeline,
    default_data_config,
    flip_decision,
    make_pipeline,
    make_source,
    tfds_data_config,
    to_float,
)
from asymflow_jax.data.sources import (
    ArrayRecordSource,
    BadRecordError,
    MnistSource,
    TfdsSource,
    center_crop_arr,
    decode_record,
    encode_record,
    load_mnist_5k,
)

__all__ = [
    "BadRecordCounter", "Pipeline", "default_data_config", "flip_decision", "make_pipeline", "make_source",
    "tfds_data_config", "to_float", "ArrayRecordSource", "BadRecordError", "MnistSource", "TfdsSource",
    "center_crop_arr", "decode_record", "encode_record", "load_mnist_5k",
]
