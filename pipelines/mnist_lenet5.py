"""LeNet-5 (32-64-512, 582,026 parameters) on MNIST, the papers' first benchmark.

Budget for 2 CPU cores at batch 128: about 17 s per float epoch and 29 s per Bayesian (Flipout)
epoch, so 8 float + 5 BNN + 2 QAT epochs take about 5 minutes of training.

Data: keras.datasets.mnist (needs internet once), or a local .npz in the keras layout
(`x_train, y_train, x_test, y_test`, uint8 images): `edgeq run pipelines/mnist_lenet5.py --data mnist.npz`.
"""

from edgeq.data import load_keras_dataset
from edgeq.models import lenet5
from edgeq.pipeline import PipelineSpec

PIPELINE = PipelineSpec(
    name="mnist_lenet5",
    build_model=lenet5,
    load_data=lambda seed=0, data=None: load_keras_dataset("mnist", seed=seed, data=data),
    epochs=8,
    bnn_epochs=5,
    qat_epochs=2,
    batch_size=128,
    target_bits=4.0,
)

if __name__ == "__main__":
    from deploy.cli import run_script

    raise SystemExit(run_script(__file__))
