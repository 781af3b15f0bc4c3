"""The offline default: scikit-learn's bundled 8x8 digits and a small conv net.

Run it with `edgeq run pipelines/digits.py --out out/` (or `python pipelines/digits.py --out out/`).

The net (24k parameters) is wider than 8x8 digits need: by default the run removes half of each hidden
layer's output channels after the twin, the least informative first, and fine-tunes the smaller model
(seeds 0-2: no less TFLM accuracy at about a third of the flash, benchmarks/results/digits_targets.md).
`--prune-channels none` deploys the full net.
"""

from edgeq.data import load_digits
from edgeq.models import digits_cnn
from edgeq.pipeline import PipelineSpec

PIPELINE = PipelineSpec(
    name="digits",
    build_model=digits_cnn,
    load_data=lambda seed=0, data=None: load_digits(seed),
    accepts_data=False,  # always scikit-learn's bundled digits: --data is refused, not ignored
    epochs=30,
    bnn_epochs=20,
    qat_epochs=5,
    target_bits=4.0,
    prune_channels=0.5,
)

if __name__ == "__main__":
    from deploy.cli import run_script

    raise SystemExit(run_script(__file__))
