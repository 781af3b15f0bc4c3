"""Two user subclasses of tf_keras Conv2D: `edgeq run tests/model_zoo/conv2d_subclass.py`.

SameConv only changes Conv2D's defaults, so it is a Conv2D to edgeq (planned); ScaledConv changes what
the layer computes, so it is left to the converter at 8 bits (listed in report.json plan.unplanned).
"""

from edgeq.data import load_digits
from edgeq.pipeline import PipelineSpec


def build(shape, n):
    import tf_keras as keras

    class SameConv(keras.layers.Conv2D):
        """A 3x3 'same' Conv2D with ReLU: new defaults only."""

        def __init__(self, filters, kernel_size=3, padding="same", activation="relu", **kwargs):
            super().__init__(filters, kernel_size, padding=padding, activation=activation, **kwargs)

    class ScaledConv(keras.layers.Conv2D):
        """A Conv2D whose output is scaled: another computation, with a config that round-trips."""

        def __init__(self, filters, kernel_size=3, scale=0.5, **kwargs):
            super().__init__(filters, kernel_size, **kwargs)
            self.scale = scale

        def call(self, x):
            return super().call(x) * self.scale

        def get_config(self):
            return {**super().get_config(), "scale": self.scale}

    return keras.Sequential(
        [
            keras.layers.Input(shape),
            SameConv(8, name="same"),
            ScaledConv(8, name="scaled", activation="relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(n, name="head"),
        ],
        name="subclass_digits",
    )


PIPELINE = PipelineSpec(
    name="conv2d_subclass",
    build_model=build,
    load_data=lambda seed=0: load_digits(seed),
    epochs=5,
    bnn_epochs=1,
    qat_epochs=1,
)
