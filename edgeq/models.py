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


def _conv_bn(x, filters: int, kernel, name: str, *, strides=1, relu: bool = True):
    """Conv2D (bias kept, as the references do) + BatchNormalization (+ ReLU), named name_conv/_bn/_relu."""
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", name=f"{name}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x) if relu else x


def _vgg(cfg, input_shape, num_classes: int, fc: tuple[int, ...], name: str) -> keras.Model:
    """CIFAR VGG: 3x3 conv-BN-ReLU blocks per cfg ("M" = 2x2 max pool), then dense layers."""
    inputs = L.Input(input_shape, name="input")
    x, block, i = inputs, 1, 1
    for c in cfg:
        if c == "M":
            x = L.MaxPooling2D(2, name=f"pool{block}")(x)
            block, i = block + 1, 1
        else:
            x = _conv_bn(x, c, 3, f"b{block}c{i}")
            i += 1
    x = L.Flatten(name="flatten")(x)
    for j, units in enumerate(fc, start=1):
        x = L.Dense(units, activation="relu", name=f"fc{j}")(x)
    outputs = L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def vgg7(input_shape=(32, 32, 3), num_classes: int = 10) -> keras.Model:
    """CIFAR VGG-7 as in the paper: 2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-1024FC-10, BN after every conv."""
    return _vgg([128, 128, "M", 256, 256, "M", 512, 512, "M"], input_shape, num_classes, (1024,), "vgg7")


def vgg16(input_shape=(32, 32, 3), num_classes: int = 10) -> keras.Model:
    """CIFAR VGG-16 with BN: 13 conv-BN-ReLU (64..512), 5 max pools, one dense layer (14.7M parameters)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    return _vgg(cfg, input_shape, num_classes, (), "vgg16")


def _basic_block(x, filters: int, strides: int, name: str):
    """ResNet v1 basic block: conv-BN-ReLU-conv-BN + shortcut (1x1 conv when the shape changes), ReLU."""
    y = _conv_bn(x, filters, 3, f"{name}_a", strides=strides)
    y = _conv_bn(y, filters, 3, f"{name}_b", relu=False)
    if strides != 1 or x.shape[-1] != filters:
        # Projection shortcut without BN, as in the Keras ResNet v1 example and MLPerf Tiny's ResNet-8.
        x = L.Conv2D(filters, 1, strides=strides, padding="same", name=f"{name}_proj")(x)
    x = L.Add(name=f"{name}_add")([x, y])
    return L.ReLU(name=f"{name}_out")(x)


def _cifar_resnet(input_shape, num_classes: int, blocks: int, name: str) -> keras.Model:
    """CIFAR ResNet v1: stem 16, three stages of `blocks` basic blocks (16/32/64), global avg pool, dense."""
    inputs = L.Input(input_shape, name="input")
    x = _conv_bn(inputs, 16, 3, "stem")
    for stage, filters in enumerate((16, 32, 64), start=1):
        for b in range(1, blocks + 1):
            strides = 2 if stage > 1 and b == 1 else 1
            x = _basic_block(x, filters, strides, f"s{stage}b{b}")
    x = L.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def resnet20(input_shape=(32, 32, 3), num_classes: int = 10) -> keras.Model:
    """CIFAR ResNet-20 (He et al.; Keras v1 example with 1x1 projections): 3 stages x 3 blocks, 16/32/64."""
    return _cifar_resnet(input_shape, num_classes, 3, "resnet20")


def resnet8(input_shape=(32, 32, 3), num_classes: int = 10) -> keras.Model:
    """MLPerf Tiny image-classification ResNet-8: 3 stages x 1 block, 16/32/64 (78,666 parameters)."""
    return _cifar_resnet(input_shape, num_classes, 1, "resnet8")


def ds_cnn(input_shape=(49, 10, 1), num_classes: int = 12) -> keras.Model:
    """MLPerf Tiny keyword-spotting DS-CNN small: 10x4 conv, 4 depthwise-separable blocks, 64 filters."""
    inputs = L.Input(input_shape, name="input")
    x = _conv_bn(inputs, 64, (10, 4), "stem", strides=2)
    x = L.Dropout(0.2, name="stem_drop")(x)
    for i in range(1, 5):
        x = L.DepthwiseConv2D(3, padding="same", name=f"ds{i}_dw")(x)
        x = L.BatchNormalization(name=f"ds{i}_dw_bn")(x)
        x = L.ReLU(name=f"ds{i}_dw_relu")(x)
        x = _conv_bn(x, 64, 1, f"ds{i}_pw")
    x = L.Dropout(0.4, name="drop")(x)
    # The reference pools (H/2, W/2) of the input: (24, 5) on the 25x5 map of a 49x10 input.
    x = L.AveragePooling2D((input_shape[0] // 2, input_shape[1] // 2), name="avgpool")(x)
    x = L.Flatten(name="flatten")(x)
    outputs = L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="ds_cnn")
