"""A Conv1D over the rows of the 8x8 digits: `edgeq run tests/model_zoo/conv1d.py`."""

from edgeq.data import load_digits
from edgeq.pipeline import PipelineSpec


def build(shape, n):
    import tf_keras as keras

    return keras.Sequential(
        [
            keras.layers.Input((8, 8)),
            keras.layers.Conv1D(8, 3, activation="relu", name="conv1d"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(n, name="head"),
        ],
        name="conv1d_digits",
    )


def load(seed=0):
    s = load_digits(seed)
    rows = [a[..., 0] for a in (s.x_train, s.x_val, s.x_test)]
    return type(s)(rows[0], s.y_train, rows[1], s.y_val, rows[2], s.y_test)


PIPELINE = PipelineSpec(
    name="conv1d", build_model=build, load_data=load, epochs=5, bnn_epochs=1, qat_epochs=1
)
