"""A subclassed tf_keras Model (layers wired in call()): `edgeq run tests/model_zoo/subclassed_model.py`."""

from edgeq.data import load_digits
from edgeq.pipeline import PipelineSpec


def build(shape, n):
    import tf_keras as keras

    class MyNet(keras.Model):
        def __init__(self):
            super().__init__(name="mynet")
            self.conv = keras.layers.Conv2D(8, 3, activation="relu", name="conv")
            self.flatten = keras.layers.Flatten(name="flatten")
            self.head = keras.layers.Dense(n, name="head")

        def call(self, x):
            return self.head(self.flatten(self.conv(x)))

    return MyNet()


PIPELINE = PipelineSpec(
    name="subclassed_model",
    build_model=build,
    load_data=lambda seed=0: load_digits(seed),
    epochs=5,
    bnn_epochs=1,
    qat_epochs=1,
)
