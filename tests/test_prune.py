"""Pruning: sparsity reached and kept through QAT and conversion; structured pruning drops channels."""

from __future__ import annotations

import numpy as np
import pytest

from deploy import export, flatbuffer
from edgeq import bayes, prune
from edgeq.optimize import quantize_model
from edgeq.plan import BitPlan


@pytest.fixture(scope="module")
def posts(tiny_keras):
    bnn = bayes.to_bayesian(tiny_keras, num_examples=1400, init_sigma=0.01)
    return bayes.posteriors(bnn)


def _loss():
    import tf_keras as keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_informativeness_masks_drop_least_informative(posts):
    masks = prune.informativeness_masks(posts, 0.75)
    for p in posts:
        info = np.abs(p.mu) / p.sigma
        kept, dropped = info[masks[p.name] == 1], info[masks[p.name] == 0]
        assert dropped.size == int(np.floor(0.75 * info.size))
        assert dropped.max() <= kept.min()


def test_magnitude_pruning_with_tfmot_reaches_sparsity(tiny_keras, digits):
    import tensorflow_model_optimization as tfmot

    x, y = digits
    pm = prune.prune_model(tiny_keras, sparsity=0.6)
    pm.compile("adam", _loss())
    pm.fit(x[:256], y[:256], epochs=1, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    assert prune.sparsity_of(prune.strip(pm)) == pytest.approx(0.6, abs=0.01)


def test_informativeness_sparsity_survives_qat_and_conversion(tiny_keras, digits, posts):
    import tf_keras as keras

    x, y = digits
    pm, keep = prune.prune_model(tiny_keras, sparsity=0.7, policy="informativeness", posteriors=posts)
    plan = BitPlan.from_bits({"conv1": 8, "fc1": 4, "fc2": 8})
    qat = quantize_model(pm, plan)
    qat.compile(keras.optimizers.Adam(1e-3), _loss())
    qat.fit(x[:512], y[:512], epochs=1, verbose=0, callbacks=[keep])
    tflite = export.convert(qat, x[:100])
    fc1 = next(t for t in flatbuffer.weight_tensors(tflite) if t.shape == (32, 1, 1, 288))  # a 1x1 conv now
    vals = flatbuffer.tensor_values(
        next(t for t, _ in flatbuffer.weight_inputs(flatbuffer.read(tflite)) if int(t.index) == fc1.index)
    )
    assert np.sum(vals == 0) >= int(np.floor(0.7 * vals.size))  # the masked weights quantize to exactly 0


def test_structured_pruning_shrinks_params_and_flash(tiny_keras, digits, posts):
    x, _ = digits
    small = prune.prune_channels(tiny_keras, prune.channel_plan(posts, 0.5, skip=("fc2",)))
    assert small.count_params() < 0.6 * tiny_keras.count_params()
    assert small.get_layer("conv1").filters == 4 and small.get_layer("fc1").units == 16
    assert len(export.convert(small, x[:50])) < len(export.convert(tiny_keras, x[:50]))


def test_structured_pruning_keeps_function_when_nothing_is_dropped(tiny_keras, digits, posts):
    x, _ = digits
    same = prune.prune_channels(tiny_keras, prune.channel_plan(posts, 0.0, skip=("fc2",)))
    np.testing.assert_allclose(
        same.predict(x[:32], verbose=0), tiny_keras.predict(x[:32], verbose=0), atol=1e-5
    )


def test_bad_inputs(tiny_keras, posts):
    with pytest.raises(prune.PruningError, match=r"\[0, 1\)"):
        prune.prune_model(tiny_keras, sparsity=1.0)
    with pytest.raises(prune.PruningError, match="posteriors"):
        prune.prune_model(tiny_keras, sparsity=0.5, policy="informativeness")
    with pytest.raises(prune.PruningError, match="policy"):
        prune.prune_model(tiny_keras, sparsity=0.5, policy="random")
    with pytest.raises(prune.PruningError, match="output layer"):
        prune.prune_channels(tiny_keras, prune.channel_plan(posts, 0.5))


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """`edgeq run pipelines/digits.py --prune 0.6 --prune-channels 0.25 --epochs 1`: the real run, its
    channels removed after the twin and its weights pruned before QAT."""
    from pathlib import Path

    from deploy.cli import main

    out = tmp_path_factory.mktemp("pruned")
    pipeline = Path(__file__).resolve().parents[1] / "pipelines" / "digits.py"
    argv = ["run", str(pipeline), "--prune", "0.6", "--prune-channels", "0.25", "--epochs", "1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    return out


def test_prune_channels_in_the_run_removes_the_least_informative_channels(pruned_run):
    import json

    import tf_keras as keras

    from deploy.export.slicing import layer_name
    from deploy.flatbuffer import read, weight_inputs

    pr = json.loads((pruned_run / "report.json").read_text())["pruning"]
    # digits_cnn: conv1 16, conv2 32, fc1 64 channels lose a quarter each; fc2 keeps its 10 classes and
    # loses the inputs that read fc1's removed channels
    kept = {c["name"]: (c["channels_kept"], c["channels"]) for c in pr["channels"]}
    assert kept == {"conv1": (12, 16), "conv2": (24, 32), "fc1": (48, 64), "fc2": (10, 10)}
    assert pr["channels_removed"] == 28 and pr["channels_total"] == 112
    model = keras.models.load_model(pruned_run / "model_float.keras")
    assert [model.get_layer(n).get_weights()[0].shape[-1] for n in ("conv1", "conv2", "fc1", "fc2")] == [
        12,
        24,
        48,
        10,
    ]
    sizes = {layer_name(str(t.name)): int(np.prod(t.shape)) for t, _ in weight_inputs(read(
        (pruned_run / "model_uncompressed.tflite").read_bytes()))}  # fmt: skip
    for c in pr["channels"]:  # the deployed layers are the smaller ones; fc1 also lost conv2's inputs
        assert c["weights_after"] == sizes[c["name"]] < c["weights_before"] and c["bytes_saved"] > 0
    assert sizes["fc2"] == 48 * 10
    assert "--prune-channels: 28 of 112 channels" in (pruned_run / "report.md").read_text()
    assert "channels kept" in (pruned_run / "report.html").read_text()


def test_prune_in_the_run_zeroes_each_layer_and_tries_the_sparse_storages(pruned_run):
    import json

    from deploy.export.slicing import layer_name
    from deploy.flatbuffer import read, tensor_values, weight_inputs

    rep = json.loads((pruned_run / "report.json").read_text())
    pr = rep["pruning"]
    assert pr["fraction"] == 0.6 and {r["name"] for r in pr["layers"]} == {"conv1", "conv2", "fc1", "fc2"}
    # the zeros the report counts are the converted model's: at least the masked 60% of every layer
    converted = read((pruned_run / "model_uncompressed.tflite").read_bytes())
    for t, _ in weight_inputs(converted):
        row = next(r for r in pr["layers"] if r["name"] == layer_name(str(t.name)))
        vals = tensor_values(t)
        assert row["zeros"] == int(np.sum(vals == 0)) >= int(0.6 * vals.size)
        assert row["entropy_bytes"] < row["fixed_width_bytes"]
    # storage auto built the kinds that pay on zeros too, each verified bit for bit, and HUFFMAN's file is
    # the smallest; auto still weighs DECODE's code, so the firmware's choice may be another
    variants = rep["models"]["deployed"]["variants"]
    assert {"int4", "lut", "prune", "huffman"} <= set(variants)
    assert variants["huffman"] < variants["int4"]
    assert "## Pruning (--prune 0.6" in (pruned_run / "report.md").read_text()
    assert "Pruning (--prune 0.6" in (pruned_run / "report.html").read_text()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--prune", v) for v in ("1", "1.5", "-0.1", "half", "nan")]
    + [("--prune-channels", v) for v in ("1", "-0.5", "most", "half")],
)
def test_prune_fraction_outside_0_1_is_refused_before_training(tmp_path, capfd, flag, value):
    from pathlib import Path

    from deploy.cli import main

    out = tmp_path / "out"
    pipeline = Path(__file__).resolve().parents[1] / "pipelines" / "digits.py"
    assert main(["run", str(pipeline), flag, value, "--out", str(out)]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("edgeq:")]
    assert len(err) == 1 and err[0].startswith(f"edgeq: error: {flag} "), err
    assert not out.exists()


def test_a_residual_add_ties_channels_and_is_named():
    import tf_keras as keras

    inp = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    b = keras.layers.Conv2D(4, 3, padding="same", name="c2")(keras.layers.ReLU()(a))
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(keras.layers.Add(name="add")([a, b])))
    with pytest.raises(prune.PruningError, match="layer 'c1' and 'c2' cannot lose channels: Add layer 'add'"):
        prune.check_channel_prunable(keras.Model(inp, out))
    one = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="only")])
    with pytest.raises(prune.PruningError, match="one weight layer"):
        prune.check_channel_prunable(one)


def test_a_pruned_form_that_cannot_be_rebuilt_is_refused_before_training(tmp_path, capfd, digits):
    """A Reshape between two weight layers: the smaller form is built (and converted) before training."""
    import tf_keras as keras

    from deploy.app import check_pruned_form

    layers = keras.layers
    m = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Flatten(),
            layers.Dense(64, name="fc1"),
            layers.Reshape((8, 8, 1), name="to_image"),
            layers.Conv2D(4, 3, name="c1"),
            layers.Flatten(),
            layers.Dense(10, name="head"),
        ]
    )
    why = r"layer 'fc1' cannot lose channels: .*'to_image'.*64 channels"
    with pytest.raises(prune.PruningError, match=why):
        check_pruned_form(m, 0.5, digits[0][:4])
    small = prune.trial_prune(tiny := _tiny_sequential(), 0.5)  # a model that shrinks: half the channels
    assert [lyr.get_weights()[0].shape[-1] for lyr in prune.kernel_layers(small)] == [2, 10]
    check_pruned_form(tiny, 0.5, digits[0][:4])  # converts: nothing raised


def _tiny_sequential():
    import tf_keras as keras

    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, name="c1"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name="head"),
        ]
    )


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--prune", "auto", "--method", "qiu"], ["--prune auto", "--method planner"]),
        (["--prune-channels", "auto", "--method", "rb"], ["--prune-channels auto", "--method planner"]),
        (["--prune-channels", "auto", "--flash-budget", "8KB"], ["--prune-channels auto", "search"]),
    ],
)
def test_auto_needs_the_planner_and_one_target(tmp_path, capfd, flags, says):
    from pathlib import Path

    from deploy.cli import main

    out = tmp_path / "out"
    pipeline = Path(__file__).resolve().parents[1] / "pipelines" / "digits.py"
    assert main(["run", str(pipeline), *flags, "--out", str(out)]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("edgeq:")]
    assert len(err) == 1 and all(w in err[0] for w in says), err
    assert not out.exists()


def test_prune_posteriors_cut_mu_and_sigma_as_prune_channels_cuts_the_weights(tiny_keras, posts):
    fractions = {"conv1": 0.5, "fc1": 0.25}
    plan = prune.channel_plan(posts, fractions)
    assert plan.kept() == {"conv1": (4, 8), "fc1": (24, 32)}  # fc2 not named: all its channels stay
    small = prune.prune_channels(tiny_keras, plan)
    cut = {p.name: p for p in prune.prune_posteriors(tiny_keras, posts, plan)}
    for name in ("conv1", "fc1", "fc2"):
        assert cut[name].mu.shape == cut[name].sigma.shape == small.get_layer(name).kernel.shape
    post = {p.name: p for p in posts}
    keep1, keep2 = plan.keep["conv1"], plan.keep["fc1"]
    # fc1 reads conv1 flattened (6x6 positions x 8 channels): its rows of the kept channels stay, in order
    rows = np.arange(6 * 6 * 8).reshape(36, 8)[:, keep1].ravel()
    np.testing.assert_array_equal(cut["fc1"].sigma, post["fc1"].sigma[rows][:, keep2])
    np.testing.assert_array_equal(cut["fc2"].mu, post["fc2"].mu[keep2])
    np.testing.assert_array_equal(cut["conv1"].mu, post["conv1"].mu[..., keep1])


def test_the_pipeline_sets_the_default_share_of_channels_and_the_flag_overrides_it(tmp_path):
    """digits removes half its channels unless --prune-channels says otherwise (none: keep them all); a
    pipeline's own share outside [0, 1) is refused, naming the pipeline."""
    from dataclasses import replace
    from pathlib import Path

    from deploy.app import RunOptions, channels_of
    from deploy.cli import _prune
    from edgeq.errors import PlanError
    from edgeq.pipeline import load_pipeline

    digits = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "digits.py")
    assert digits.prune_channels == 0.5
    given = {None: 0.5, "none": None, "0": None, "0.25": 0.25}
    for flag, share in given.items():
        opts = RunOptions(out=tmp_path, prune_channels=_prune(flag, "--prune-channels"))
        assert channels_of(digits, opts) == share, flag
    assert channels_of(replace(digits, prune_channels=0.0), RunOptions(out=tmp_path)) is None
    with pytest.raises(PlanError, match="pipeline 'digits' sets prune_channels=1.5"):
        channels_of(replace(digits, prune_channels=1.5), RunOptions(out=tmp_path))


def _residual_model():
    """stem -> [a_conv, BN, ReLU, b_conv] + stem -> Add -> GAP -> head: only a_conv's channels are free."""
    import tf_keras as keras

    L = keras.layers
    inp = keras.Input((8, 8, 1))
    stem = L.Conv2D(6, 3, padding="same", name="stem")(inp)
    y = L.ReLU(name="a_relu")(
        L.BatchNormalization(name="a_bn")(L.Conv2D(8, 3, padding="same", name="a_conv")(stem))
    )
    y = L.Conv2D(6, 3, padding="same", name="b_conv")(y)
    x = L.GlobalAveragePooling2D(name="gap")(L.Add(name="add")([stem, y]))
    model = keras.Model(inp, L.Dense(3, name="head")(x), name="res")
    rng = np.random.default_rng(0)
    bn = model.get_layer("a_bn")  # moving statistics away from 0/1, so a wrong slice shows
    bn.set_weights([rng.uniform(0.5, 2.0, v.shape).astype("float32") for v in bn.get_weights()])
    return model


def test_a_residual_model_loses_only_its_free_channels_and_computes_the_same():
    """The pruned functional model equals the original with the dropped channels' readers zeroed."""
    import tf_keras as keras

    model = _residual_model()
    ties = prune.channel_ties(model)
    assert set(ties) == {"stem", "b_conv", "head"} and "Add layer 'add'" in ties["stem"]
    assert prune.free_layers(model) == ["a_conv"]
    keep = np.array([0, 3, 4, 7])
    small = prune.prune_channels(model, prune.ChannelPlan({"a_conv": keep}, {"a_conv": 8}))
    assert small.get_layer("a_conv").get_weights()[0].shape == (3, 3, 6, 4)
    assert small.get_layer("a_bn").get_weights()[0].shape == (4,)
    assert small.get_layer("b_conv").get_weights()[0].shape == (3, 3, 4, 6)
    same = keras.models.clone_model(model)
    same.set_weights(model.get_weights())
    reader = same.get_layer("b_conv")
    w = reader.get_weights()
    w[0][:, :, np.setdiff1d(np.arange(8), keep), :] = 0.0
    reader.set_weights(w)
    x = np.random.default_rng(1).random((5, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(small.predict(x, verbose=0), same.predict(x, verbose=0), atol=1e-5)
    assert not np.allclose(small.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-3)
    with pytest.raises(prune.PruningError, match="layer 'b_conv' cannot lose channels: Add layer 'add'"):
        prune.prune_channels(model, prune.ChannelPlan({"b_conv": np.arange(3)}, {"b_conv": 6}))
    assert [k.get_weights()[0].shape[-1] for k in prune.kernel_layers(prune.trial_prune(model, 0.5))] == [
        6,
        4,
        6,
        3,
    ]


def test_resnet8_prunes_the_first_conv_of_each_block(tmp_path, digits):
    from deploy.app import check_pruned_form
    from edgeq.models import resnet8

    model = resnet8((8, 8, 1), 10)
    assert prune.free_layers(model) == ["s1b1_a_conv", "s2b1_a_conv", "s3b1_a_conv"]
    check_pruned_form(model, 0.25, digits[0][:4])  # rebuilds and converts: nothing raised


@pytest.mark.slow
def test_prune_channels_auto_in_the_run_reports_every_choice_it_validated(tmp_path):
    """`edgeq run pipelines/digits.py --prune-channels auto --target-bits 2.5 --epochs 2`: the walk's
    choice is the one the run deploys, its trials in bitplan.json and report.md (the fast tests of
    shrink_auto are in test_cost_model)."""
    import json
    from pathlib import Path

    from deploy.cli import main

    out = tmp_path / "auto"
    pipeline = Path(__file__).resolve().parents[1] / "pipelines" / "digits.py"
    argv = ["run", str(pipeline), "--prune-channels", "auto", "--target-bits", "2.5", "--epochs", "2"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    choice = json.loads((out / "bitplan.json").read_text())["meta"]["channel_choice"]
    best = min((t for t in choice["trials"] if t["val_loss"] is not None), key=lambda t: t["val_loss"])
    assert choice["fractions"] == {n: f for n, f in best["fractions"].items() if f}
    rep = json.loads((out / "report.json").read_text())
    pr = rep.get("pruning") or {"channels": []}
    # the layers that lost channels (not those that only lost the inputs reading removed ones)
    kept = {
        c["name"]: (c["channels_kept"], c["channels"])
        for c in pr["channels"]
        if c["channels_kept"] < c["channels"]
    }
    assert kept == {n: (prune.kept_count(c, choice["fractions"][n]), c) for n, (_, c) in kept.items()}
    assert set(kept) == set(choice["fractions"])
    md = (out / "report.md").read_text()
    assert "the planner validated" in md and "the planner validated" in (out / "report.html").read_text()
    assert md.count("| ") > len(choice["trials"])
    if choice["fractions"]:
        assert "the planner's choice" in md
    assert rep["models"]["deployed"]["flash_bytes"] <= choice["flash_budget"]
