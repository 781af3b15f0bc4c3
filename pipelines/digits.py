"""The offline default: scikit-learn's bundled 8x8 digits and a small conv net.

Run it with `edgeq run pipelines/digits.py --out out/` (or `python pipelines/digits.py --out out/`).
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
)

if __name__ == "__main__":
    from deploy.cli import run_script

    raise SystemExit(run_script(__file__))
