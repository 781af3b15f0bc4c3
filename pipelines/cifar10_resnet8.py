"""MLPerf Tiny's image-classification ResNet-8 (16/32/64 filters, 78,666 parameters) on CIFAR-10.

About 1 ms per training image on 2 CPU cores at batch 128 (about 46-48 s per float epoch on 45,000
images, with or without the augmentation; roughly twice that as a Flipout BNN): 30 float + 5 BNN + 2 QAT
epochs take about 40 minutes. The float stage augments (flips, shifts of up to 4 pixels) and decays its
learning rate to 0 on a cosine; MLPerf Tiny trains 500 epochs with augmentation, so expect lower float
accuracy from this budget.

Data: keras.datasets.cifar10 (needs internet once), or a local .npz in the keras layout
(`x_train, y_train, x_test, y_test`, uint8 images):
`edgeq run pipelines/cifar10_resnet8.py --data cifar10.npz`.
"""

import tf_keras as keras

from edgeq.data import load_keras_dataset
from edgeq.models import resnet8
from edgeq.pipeline import PipelineSpec

# MLPerf Tiny's training augments with flips and shifts; made once here, applied to each float batch
_FLIP = keras.layers.RandomFlip("horizontal")
_SHIFT = keras.layers.RandomTranslation(0.125, 0.125, fill_mode="reflect")


def augment(images):
    """A batch of training images, each flipped left-right at random and shifted by up to 4 pixels."""
    return _SHIFT(_FLIP(images, training=True), training=True)


PIPELINE = PipelineSpec(
    name="cifar10_resnet8",
    build_model=resnet8,
    load_data=lambda seed=0, data=None: load_keras_dataset("cifar10", seed=seed, data=data),
    epochs=30,
    bnn_epochs=5,
    qat_epochs=2,
    batch_size=128,
    target_bits=4.0,
    augment=augment,
    lr_schedule="cosine",
)

if __name__ == "__main__":
    from deploy.cli import run_script

    raise SystemExit(run_script(__file__))
