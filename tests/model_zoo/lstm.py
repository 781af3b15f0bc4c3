"""An LSTM over the rows of the 8x8 digits (8 steps of 8 features): `edgeq run tests/model_zoo/lstm.py`."""

from edgeq.data import load_digits
from edgeq.pipeline import PipelineSpec


def build(shape, n):
    import tf_keras as keras

    return keras.Sequential(
        [
            keras.layers.Input((8, 8)),
            keras.layers.LSTM(16, name="lstm"),
            keras.layers.Dense(n, name="head"),
        ],
        name="lstm_digits",
    )


def load(seed=0):
    s = load_digits(seed)
    rows = [a[..., 0] for a in (s.x_train, s.x_val, s.x_test)]  # (n, 8, 8, 1) -> 8 steps of 8
    return type(s)(rows[0], s.y_train, rows[1], s.y_val, rows[2], s.y_test)


PIPELINE = PipelineSpec(name="lstm", build_model=build, load_data=load, epochs=12, bnn_epochs=1, qat_epochs=1)
