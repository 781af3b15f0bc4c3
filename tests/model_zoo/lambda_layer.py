"""A Lambda layer between a Conv2D and the head: `edgeq run tests/model_zoo/lambda_layer.py`."""

from edgeq.data import load_digits
from edgeq.pipeline import PipelineSpec


def build(shape, n):
    import tf_keras as keras

    return keras.Sequential(
        [
            keras.layers.Input(shape),
            keras.layers.Conv2D(8, 3, name="conv"),
            keras.layers.Lambda(lambda t: t * 0.5, name="halve"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(n, name="head"),
        ],
        name="lambda_digits",
    )


PIPELINE = PipelineSpec(
    name="lambda",
    build_model=build,
    load_data=lambda seed=0: load_digits(seed),
    epochs=5,
    bnn_epochs=1,
    qat_epochs=1,
)
