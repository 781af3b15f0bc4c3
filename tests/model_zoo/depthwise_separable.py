"""DepthwiseConv2D and SeparableConv2D: `edgeq run tests/model_zoo/depthwise_separable.py`."""

from edgeq.data import load_digits
from edgeq.pipeline import PipelineSpec


def build(shape, n):
    import tf_keras as keras

    return keras.Sequential(
        [
            keras.layers.Input(shape),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
            keras.layers.DepthwiseConv2D(3, activation="relu", name="dw"),
            keras.layers.SeparableConv2D(8, 3, activation="relu", name="sep"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(n, name="head"),
        ],
        name="dwsep_digits",
    )


PIPELINE = PipelineSpec(
    name="depthwise_separable",
    build_model=build,
    load_data=lambda seed=0: load_digits(seed),
    epochs=5,
    bnn_epochs=1,
    qat_epochs=1,
)
