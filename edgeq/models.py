"""Keras (tf_keras) model zoo: the architectures the papers and MLPerf Tiny use."""

from __future__ import annotations

import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)

L = keras.layers


def digits_cnn(input_shape=(8, 8, 1), num_classes: int = 10) -> keras.Model:
    """The offline default: a small conv net for 8x8 digits (about 10k weights)."""
    return keras.Sequential(
        [
            L.Input(input_shape),
            L.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            L.Conv2D(32, 3, activation="relu", name="conv2"),
            L.MaxPooling2D(2, name="pool"),
            L.Flatten(name="flatten"),
            L.Dense(64, activation="relu", name="fc1"),
            L.Dense(num_classes, name="fc2"),
        ],
        name="digits_cnn",
    )


def lenet5(input_shape=(28, 28, 1), num_classes: int = 10) -> keras.Model:
    """LeNet-5 as in both papers: conv 32-64 5x5, dense 512 (582k parameters on MNIST)."""
    return keras.Sequential(
        [
            L.Input(input_shape),
            L.Conv2D(32, 5, activation="relu", name="conv1"),
            L.MaxPooling2D(2, name="pool1"),
            L.Conv2D(64, 5, activation="relu", name="conv2"),
            L.MaxPooling2D(2, name="pool2"),
            L.Flatten(name="flatten"),
            L.Dense(512, activation="relu", name="fc1"),
            L.Dense(num_classes, name="fc2"),
        ],
        name="lenet5",
    )


def mlp(input_shape=(10,), num_outputs: int = 1, hidden=(512, 256, 64)) -> keras.Model:
    """The paper's regression MLP (123FC-512FC-256FC-64FC on Shifts weather); any input width."""
    layers = [L.Input(input_shape)]
    layers += [L.Dense(h, activation="relu", name=f"fc{i + 1}") for i, h in enumerate(hidden)]
    layers.append(L.Dense(num_outputs, name="out"))
    return keras.Sequential(layers, name="mlp")
