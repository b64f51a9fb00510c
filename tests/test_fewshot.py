"""Frozen-representation evaluation: the closed-form regression, kNN, the probe, and on digits a trained
tiny ViT against the same model at random, during training and from the command line."""
import json

import numpy as np
import pytest

from vit_jax import fewshot


def test_ridge_regression_equals_lstsq():
  rng = np.random.default_rng(0)
  for n, d in ((40, 7), (6, 15)):  # more examples than features, and fewer (the dual form)
    x, t = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    np.testing.assert_allclose(fewshot.ridge_regression(x, t, 0.0), np.linalg.lstsq(x, t, rcond=None)[0],
                               rtol=1e-8, atol=1e-10)
    # Ridge = least squares on the rows sqrt(l2) * I appended with zero targets.
    l2 = 3.0
    augmented = np.concatenate([x, np.sqrt(l2) * np.eye(d)]), np.concatenate([t, np.zeros((d, 3))])
    np.testing.assert_allclose(fewshot.ridge_regression(x, t, l2), np.linalg.lstsq(*augmented, rcond=None)[0],
                               rtol=1e-8, atol=1e-10)


def test_fewshot_classifier_is_the_lstsq_solution_on_standardised_features():
  rng = np.random.default_rng(1)
  x, labels = rng.normal(size=(30, 5)) * [1, 2, 3, 4, 5] + 7, rng.integers(0, 3, 30)
  classifier = fewshot.fit_least_squares(x, labels, num_classes=3, l2_reg=0.0)
  design = np.concatenate([(x - x.mean(0)) / (x.std(0) + fewshot.STD_EPS), np.full((30, 1), fewshot.BIAS_FEATURE)], 1)
  targets = np.where(labels[:, None] == np.arange(3), 1.0, -1.0)
  np.testing.assert_allclose(classifier.weights, np.linalg.lstsq(design, targets, rcond=None)[0], rtol=1e-7, atol=1e-9)
  np.testing.assert_array_equal(classifier.predict(x), np.argmax(design @ classifier.weights, 1))


def test_knn_with_k1_on_its_own_memory_is_exact_and_fewshot_checks_shots():
  rng = np.random.default_rng(2)
  x, labels = rng.normal(size=(200, 16)), rng.integers(0, 7, 200)  # random labels: only memory can be exact
  assert fewshot.knn_accuracy(x, labels, x, labels, ks=(1,)) == {1: 1.0}
  # With a high temperature the votes are nearly equal: 20 neighbours with random labels outvote the match.
  assert fewshot.knn_accuracy(x, labels, x, labels, ks=(20,), temperature=100.0)[20] < 0.6
  with pytest.raises(ValueError, match="classes with fewer"):
    fewshot.fewshot_accuracy(x, labels, x, labels, shots=(100,), seeds=1)


def test_linear_probe_sweeps_c_on_held_out_data():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(4, 8)) * 3
  labels = rng.integers(0, 4, 400)
  x = centres[labels] + rng.normal(size=(400, 8))
  result = fewshot.linear_probe(x[:300], labels[:300], x[300:], labels[300:])
  assert set(result["validation"]) == set(fewshot.PROBE_CS) and result["C"] in fewshot.PROBE_CS
  assert result["accuracy"] > 0.9


# ----------------------------------------------------------------------------- digits

STEPS, EVERY = 100, 50


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, load_config):
  """A tiny ViT trained on digits with the few-shot evaluation on; (workdir, config, final metrics)."""
  from vit_jax.train import trainer
  workdir = tmp_path_factory.mktemp("fewshot_run")
  config = load_config("testing", "dataset=digits")
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.model.hidden_size, config.model.mlp_dim, config.model.num_heads = 64, 128, 4
  config.batch_size, config.eval_batch_size = 128, 256
  config.total_steps, config.warmup_steps, config.lr = STEPS, 10, 4e-3
  config.checkpoint_every, config.eval_every, config.log_every, config.progress_secs = 0, 0, 50, 60.0
  config.fewshot.dataset, config.fewshot_every, config.fewshot.shots, config.fewshot.seeds = "digits", EVERY, (1, 10), 2
  config.mesh.data = 2  # sharded, but 2 simulated devices run faster than 8 on a small CPU
  final = trainer.train_and_evaluate(config, str(workdir))
  return workdir, config, final


def test_fewshot_during_training_is_logged(digits_run):
  workdir, _, final = digits_run
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = {line["step"]: line for line in lines if "fewshot_10shot" in line}
  assert sorted(logged) == [EVERY, STEPS]
  assert {"fewshot_1shot", "fewshot_1shot_std", "fewshot_10shot_std"} <= set(logged[STEPS])
  assert final["fewshot_10shot"] == logged[STEPS]["fewshot_10shot"]


def test_trained_beats_random_init_by_far_from_the_command_line(digits_run, capsys, monkeypatch):
  workdir, _, _ = digits_run
  results = {}
  for name, extra in (("trained", []), ("random", ["--random-init", "--no-probe"])):
    out = workdir / f"{name}.json"
    assert fewshot.main(["--workdir", str(workdir), "--shots", "10", "--seeds", "3", "--knn", "10",
                         "--json", str(out)] + extra) == 0
    results[name] = json.loads(out.read_text())
  printed = capsys.readouterr().out
  assert "10-shot" in printed and "kNN" in printed and "linear probe" in printed
  trained, random = results["trained"]["fewshot"]["10"]["mean"], results["random"]["fewshot"]["10"]["mean"]
  assert trained > random + 0.3, (trained, random)
  assert results["trained"]["knn"]["10"] > results["random"]["knn"]["10"] + 0.15
  assert results["trained"]["probe"]["accuracy"] > 0.7
  assert results["trained"]["train_examples"] == 1438 and results["trained"]["test_examples"] == 359
  assert len(list((workdir / "features").glob("*.npz"))) == 4  # train/test x trained/random

  # A second run reads the cached features instead of computing them.
  monkeypatch.setattr(fewshot, "compute_features", lambda *a, **k: pytest.fail("features were recomputed"))
  assert fewshot.main(["--workdir", str(workdir), "--shots", "10", "--knn", "--no-probe"]) == 0


def test_features_cover_every_example_once(digits_run):
  import jax
  from vit_jax import data, predict
  from vit_jax.models import registry
  from vit_jax.train import sharding as shd
  workdir, config, _ = digits_run
  model, variables, _ = predict.restore(str(workdir))
  mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  batches = data.get_dataset("digits", "test", batch_size=48, image_size=8, train=False, data_dir=config.data_dir)
  features, labels = fewshot.compute_features(model, variables, batches, mesh)  # 359 = 7 full batches + 23
  assert features.shape == (359, 64) and labels.shape == (359,)
  every = next(iter(data.get_dataset("digits", "test", batch_size=359, image_size=8, train=False,
                                     data_dir=config.data_dir)))
  np.testing.assert_array_equal(labels, every["label"])
  np.testing.assert_allclose(features, jax.jit(registry.features, static_argnums=0)(model, variables, every["image"]),
                             rtol=1e-5, atol=1e-5)


def test_bad_input_is_named(digits_run, tmp_path):
  from vit_jax.train import trainer
  workdir, config, _ = digits_run
  with pytest.raises(SystemExit, match="no_such_dataset"):
    fewshot.main(["--workdir", str(workdir), "--dataset", "no_such_dataset"])
  bad = config.copy_and_resolve_references()
  bad.fewshot.dataset = "no_such_dataset"
  with pytest.raises(ValueError, match="no_such_dataset"):
    trainer.train_and_evaluate(bad, str(tmp_path / "bad"))
