r"""Evaluating a frozen representation: few-shot linear regression, kNN and a linear probe.

    python -m vit_jax.fewshot --workdir /tmp/vit_digits                     # the run's data set
    python -m vit_jax.fewshot --workdir /tmp/vit_digits --random-init       # the same model, untrained
    python -m vit_jax.fewshot --model ViT-B_16 --weights ViT-B_16.npz --dataset cifar100

The representation is the model's pre-logit features (`registry.features`: what the
head sees), of every example of the training and the test split, computed once,
sharded over the devices like evaluation (padded batches masked) and cached per
checkpoint and data set; the three evaluations reuse them:

  few-shot   as the ViT paper and big_vision's `fewshot_lsr`: per draw, `shots` random
             training examples per class; features standardised with the draw's mean/std,
             a constant feature of 100 as a nearly unregularised bias, closed-form ridge
             regression (l2 2^10) onto {-1, +1} one-hot targets; top-1 on the test split.
             Mean and standard deviation over `seeds` draws.
  kNN        the DINO recipe: cosine similarity to the whole training split, the k nearest
             vote with weight exp(similarity / 0.07); k = 10 and 20.
  probe      logistic regression (L-BFGS) on standardised features; the inverse L2 strength C
             is picked on a held-out 20% of the training split, then refit on all of it.

During training, `config.fewshot.dataset` (with `config.fewshot_every`) runs the few-shot
evaluation on the current parameters and logs `fewshot_{k}shot` (TensorBoard, metrics.jsonl).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

SHOTS = (1, 5, 10, 25)
L2_REG = 2.0 ** 10          # big_vision's default for the few-shot regression
BIAS_FEATURE = 100.0        # large, so that its weight is hardly regularised (big_vision)
STD_EPS = 1e-5
KNN_KS = (10, 20)
KNN_TEMPERATURE = 0.07      # DINO
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
PROBE_HOLDOUT = 0.2


# ----------------------------------------------------------------------------- features

def _feature_step(model, mesh, variable_shardings):
  import jax
  from vit_jax.models import registry
  from vit_jax.train import sharding as shd

  def step(variables, batch):
    return registry.features(model, variables, batch["image"]), batch["label"], batch["mask"]

  return jax.jit(step, in_shardings=(variable_shardings, shd.batch_shardings(mesh, shd.EVAL_KEYS)))


def compute_features(model, variables, batches: Iterable[dict], mesh, variable_shardings=None,
                     step: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, d] float32, labels [n]) of every real example of one evaluation pass `batches`.

  `batches`: this process's padded host batches (`vit_jax.data.get_dataset(..., train=False)`);
  they are split over the mesh's data-parallel axes, the padding (mask False) is dropped.
  `variables` are placed by `variable_shardings` (default: replicated); `step` reuses a
  compiled feature step (`_feature_step`).
  """
  import jax
  from jax.experimental import multihost_utils
  from vit_jax.data import device
  from vit_jax.train import sharding as shd

  if variable_shardings is None:
    variable_shardings = shd.replicated(mesh)
    variables = jax.device_put(variables, variable_shardings)
  step = step or _feature_step(model, mesh, variable_shardings)
  features, labels = [], []
  for batch in device.prefetch_to_device(iter(batches), 2, shd.batch_shardings(mesh, shd.EVAL_KEYS)):
    out = step(variables, batch)
    x, y, mask = (np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in out)
    features.append(x[mask])
    labels.append(y[mask])
  if not features:
    raise ValueError("the data set split holds no examples.")
  return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int64)


class FeatureCache:
  """Features of one checkpoint on one data split, as .npz files named by a hash of what made them."""

  def __init__(self, directory: str | None):
    self.directory = directory

  def path(self, identity: Mapping[str, Any]) -> str | None:
    if not self.directory:
      return None
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    tag = "".join(c if c.isalnum() else "_" for c in f"{identity.get('dataset', '')}_{identity.get('split', '')}")
    return os.path.join(self.directory, f"{tag}_{digest}.npz")

  def get_or_compute(self, identity: Mapping[str, Any], compute: Callable[[], tuple[np.ndarray, np.ndarray]]):
    import jax
    path = self.path(identity)
    if path and os.path.exists(path):
      with np.load(path) as f:
        return f["features"], f["labels"]
    features, labels = compute()
    if path and jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      partial = f"{path}.{os.getpid()}.tmp.npz"
      np.savez(partial, features=features, labels=labels, identity=json.dumps(identity, default=str))
      os.replace(partial, path)  # never a half-written cache file under the real name
    return features, labels


# ----------------------------------------------------------------------------- few-shot regression

def ridge_regression(x, targets, l2_reg: float) -> np.ndarray:
  """argmin_w |x w - targets|^2 + l2_reg |w|^2, in closed form and float64: [d, classes].

  Solved in the smaller of the two spaces, (x^T x + l2 I)^-1 x^T t with more examples than
  features, x^T (x x^T + l2 I)^-1 t otherwise (equal for l2 > 0; for l2 = 0 the latter is the
  minimum-norm solution, as numpy.linalg.lstsq's).
  """
  x, targets = np.asarray(x, np.float64), np.asarray(targets, np.float64)
  n, d = x.shape
  if n >= d:
    return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
  return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)


@dataclasses.dataclass
class LinearClassifier:
  """Standardise with `mean`/`std`, append the bias feature, argmax of the linear map `weights`."""
  mean: np.ndarray
  std: np.ndarray
  weights: np.ndarray  # [d + 1, classes]

  def design(self, x) -> np.ndarray:
    x = (np.asarray(x, np.float64) - self.mean) / self.std
    return np.concatenate([x, np.full((x.shape[0], 1), BIAS_FEATURE)], axis=1)

  def predict(self, x) -> np.ndarray:
    return np.argmax(self.design(x) @ self.weights, axis=1)


def fit_least_squares(x, labels, num_classes: int, l2_reg: float = L2_REG) -> LinearClassifier:
  """big_vision's few-shot classifier: ridge regression of standardised features onto {-1, +1}."""
  x = np.asarray(x, np.float64)
  classifier = LinearClassifier(x.mean(axis=0), x.std(axis=0) + STD_EPS, np.zeros(0))
  targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  classifier.weights = ridge_regression(classifier.design(x), targets, l2_reg)
  return classifier


def fewshot_accuracy(train_x, train_y, test_x, test_y, shots: Sequence[int] = SHOTS, *, seeds: int = 5,
                     l2_reg: float = L2_REG) -> dict[int, np.ndarray]:
  """shots -> test accuracy of each of `seeds` draws of `shots` training examples per class."""
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  classes = np.unique(train_y)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  members = {c: np.flatnonzero(train_y == c) for c in classes}
  results = {}
  for shot in shots:
    short = {int(c): len(m) for c, m in members.items() if len(m) < shot}
    if shot < 1 or short:
      raise ValueError(f"{shot}-shot needs {shot} training examples of every class; "
                       + (f"classes with fewer: {short}." if short else "shots must be >= 1."))
    accuracies = []
    for seed in range(seeds):
      rng = np.random.default_rng([seed, shot])
      chosen = np.concatenate([rng.choice(members[c], shot, replace=False) for c in classes])
      classifier = fit_least_squares(np.asarray(train_x)[chosen], train_y[chosen], num_classes, l2_reg)
      accuracies.append(float(np.mean(classifier.predict(test_x) == test_y)))
    results[int(shot)] = np.asarray(accuracies)
  return results


# ----------------------------------------------------------------------------- kNN and linear probe

def knn_accuracy(bank_x, bank_y, test_x, test_y, ks: Sequence[int] = KNN_KS, temperature: float = KNN_TEMPERATURE,
                 chunk: int = 256) -> dict[int, float]:
  """k -> top-1 of the DINO kNN classifier with the memory bank (`bank_x`, `bank_y`)."""
  import jax
  import jax.numpy as jnp

  def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  bank, queries = jnp.asarray(unit(bank_x)), unit(test_x)
  bank_y, test_y = np.asarray(bank_y), np.asarray(test_y)
  k_max = max(ks)
  if k_max > bank.shape[0]:
    raise ValueError(f"k={k_max} exceeds the {bank.shape[0]} examples of the memory bank.")
  num_classes = int(max(bank_y.max(), test_y.max())) + 1
  nearest = jax.jit(lambda q: jax.lax.top_k(q @ bank.T, k_max))
  correct = {k: 0 for k in ks}
  for start in range(0, len(queries), chunk):
    similarity, index = (np.asarray(a) for a in nearest(jnp.asarray(queries[start:start + chunk])))
    votes_by = np.eye(num_classes)[bank_y[index]] * np.exp(similarity / temperature)[..., None]
    for k in ks:
      predicted = np.argmax(votes_by[:, :k].sum(axis=1), axis=1)
      correct[k] += int(np.sum(predicted == test_y[start:start + chunk]))
  return {k: correct[k] / len(queries) for k in ks}


def linear_probe(train_x, train_y, test_x, test_y, *, cs: Sequence[float] = PROBE_CS,
                 holdout: float = PROBE_HOLDOUT, seed: int = 0, max_iter: int = 1000) -> dict[str, Any]:
  """Logistic regression (L-BFGS) on standardised frozen features; C chosen on a held-out part of the
  training split, then refit on all of it.  {"accuracy", "C", "validation": {C: accuracy}}."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import train_test_split
  from sklearn.preprocessing import StandardScaler
  import threadpoolctl  # scikit-learn's own dependency

  train_y = np.asarray(train_y)
  stratify = train_y if np.min(np.unique(train_y, return_counts=True)[1]) >= 2 else None
  fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=holdout, random_state=seed,
                                                stratify=stratify)
  # Small problems run single-threaded: L-BFGS makes many tiny loss calls, and OpenMP threads that
  # synchronise on each made it 100x slower on a busy 2-core machine.
  threads = 1 if np.size(train_x) < 10_000_000 else None
  with warnings.catch_warnings(), threadpoolctl.threadpool_limits(threads):
    # A weakly regularised fit may stop at max_iter; its held-out score says enough.
    warnings.simplefilter("ignore", ConvergenceWarning)
    scaler = StandardScaler().fit(fit_x)
    # From strong to weak regularisation, each fit starting at the previous solution: the sweep costs
    # little more than one fit.
    classifier = LogisticRegression(max_iter=max_iter, warm_start=True)
    validation = {}
    for c in sorted(cs):
      classifier.set_params(C=c).fit(scaler.transform(fit_x), fit_y)
      validation[float(c)] = float(classifier.score(scaler.transform(val_x), val_y))
    best = max(validation, key=lambda c: (validation[c], -c))  # ties: the stronger regularisation
    scaler = StandardScaler().fit(train_x)
    final = LogisticRegression(C=best, max_iter=max_iter).fit(scaler.transform(train_x), train_y)
  return {"accuracy": float(final.score(scaler.transform(test_x), test_y)), "C": best, "validation": validation}


# ----------------------------------------------------------------------------- during training

class TrainingEvaluator:
  """`config.fewshot` in the train loop: `evaluator(state) -> {"fewshot_{k}shot": mean accuracy, ...}`.

  Built once at start (the data set is opened then, so a bad name fails before training);
  each call computes the features of the current parameters, sharded as the train state.
  """

  def __init__(self, config, setup):
    import jax
    from vit_jax import data
    settings = config.fewshot
    self.shots, self.seeds, self.l2_reg = tuple(int(s) for s in settings.shots), int(settings.seeds), settings.l2_reg
    if not self.shots or min(self.shots) < 1 or self.seeds < 1:
      raise ValueError(f"config.fewshot: shots must be positive and seeds >= 1, got shots={settings.shots}, "
                       f"seeds={settings.seeds}.")
    same = settings.dataset == config.dataset
    try:
      source = setup.source if same else data.get_source(settings.dataset, config.data_dir or None)
    except ValueError:
      raise
    except Exception as e:  # e.g. TFDS's DatasetNotFoundError
      raise ValueError(f"config.fewshot.dataset={settings.dataset!r} cannot be opened: {e}") from e
    # The evaluation preprocessing of the run (its normalisation) on its own data set.
    options = dict(config.input_eval) if same else {
        k: v for k, v in config.input_eval.items() if k in ("normalization", "crop", "crop_pct")}
    self.batches = {
        split: data.get_dataset(settings.dataset, split, batch_size=config.eval_batch_size // jax.process_count(),
                                image_size=config.image_size, train=False, seed=config.seed, source=source, **options)
        for split in (settings.train_split, settings.test_split)}
    self.splits = (settings.train_split, settings.test_split)
    self.mesh = setup.mesh
    self.variable_shardings = {"params": setup.shardings.params}
    self.has_batch_stats = bool(jax.tree.leaves(setup.shardings.batch_stats))
    if self.has_batch_stats:
      self.variable_shardings["batch_stats"] = setup.shardings.batch_stats
    self.step = _feature_step(setup.model, setup.mesh, self.variable_shardings)
    self.model = setup.model

  def __call__(self, state) -> dict[str, float]:
    import jax
    variables = {"params": state.params}
    if self.has_batch_stats:
      variables["batch_stats"] = state.batch_stats
    (train_x, train_y), (test_x, test_y) = [
        self._features(variables, self.batches[split]) for split in self.splits]
    accuracies = fewshot_accuracy(train_x, train_y, test_x, test_y, self.shots, seeds=self.seeds, l2_reg=self.l2_reg)
    metrics = {}
    for shot, values in accuracies.items():
      metrics[f"fewshot_{shot}shot"] = float(values.mean())
      metrics[f"fewshot_{shot}shot_std"] = float(values.std())
    if jax.process_index() == 0:
      print("few-shot: " + ", ".join(f"{shot}-shot {metrics[f'fewshot_{shot}shot']:.2%}" for shot in accuracies),
            flush=True)
    return metrics

  def _features(self, variables, batches):
    batches.reset()
    return compute_features(self.model, variables, batches, self.mesh, self.variable_shardings, self.step)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
  from vit_jax import predict
  p = argparse.ArgumentParser(prog="python -m vit_jax.fewshot", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  predict.add_model_arguments(p, random_init=True)
  p.add_argument("--dataset", help="TFDS name, digits, folder:PATH (default: a --workdir run's)")
  p.add_argument("--train-split", help="few-shot draws, kNN memory, probe training (default: train)")
  p.add_argument("--test-split", help="default: a run's eval split, else test")
  p.add_argument("--data-dir", help="TFDS data directory (default: a run's, else TFDS's)")
  p.add_argument("--batch-size", type=int, default=256, help="global batch of the feature pass")
  p.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
  p.add_argument("--seeds", type=int, default=5, help="random draws of the shots")
  p.add_argument("--l2-reg", type=float, default=L2_REG)
  p.add_argument("--knn", type=int, nargs="*", default=list(KNN_KS), help="k of the kNN evaluation (none: skip)")
  p.add_argument("--no-probe", action="store_true", help="skip the linear probe")
  p.add_argument("--cache-dir", help="feature cache (default: WORKDIR/features for --workdir, else none)")
  p.add_argument("--json", help="also write the results to this JSON file")
  args = p.parse_args(argv)
  predict.check_model_arguments(p, args, random_init=True)
  if args.dataset is None and args.workdir is None:
    p.error("give --dataset (a --workdir run defaults to its own).")
  if args.batch_size < 1 or args.seeds < 1 or min(args.shots) < 1:
    p.error("--batch-size, --seeds and --shots must be positive.")
  return args


def _identity(args, opened, dataset: str, split: str) -> dict[str, Any]:
  """What the features of one split depend on: the checkpoint, the model, the data and its preprocessing."""
  if args.workdir:
    from vit_jax.train import checkpoint
    steps = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(args.workdir)) if s.isdigit())
    weights = {"workdir": os.path.abspath(args.workdir), "step": args.step or (steps[-1] if steps else None)}
  elif args.weights and os.path.exists(args.weights):
    stat = os.stat(args.weights)
    weights = {"weights": os.path.abspath(args.weights), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
  else:
    weights = {"weights": args.weights}
  if args.random_init or not (args.workdir or args.weights):
    weights["random_init_seed"] = args.seed
  return {**weights, "model": repr(opened.model), "dataset": dataset, "split": split,
          "normalization": opened.normalization, "crop": opened.crop, "crop_pct": opened.crop_pct}


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  from vit_jax import data, predict
  from vit_jax.train import sharding as shd

  opened = predict.open_model(args)
  config = opened.config
  run = config or {}
  dataset = args.dataset or run["dataset"]
  train_split = args.train_split or run.get("train_split", "train")
  test_split = args.test_split or run.get("eval_split", "test")
  data_dir = args.data_dir or run.get("data_dir", "") or None
  cache_dir = args.cache_dir or (os.path.join(args.workdir, "features") if args.workdir else None)
  try:
    source = data.get_source(dataset, data_dir)
  except Exception as e:  # unknown names list the choices; TFDS errors say what is missing
    raise SystemExit(f"data set {dataset!r} cannot be opened: {e}")
  mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})  # data parallel over every device
  data_parallel = mesh.shape["data"]
  batch_size = -(-args.batch_size // data_parallel) * data_parallel  # whole batches per device
  replicated = shd.replicated(mesh)
  variables = jax.device_put(opened.variables, replicated)
  step = _feature_step(opened.model, mesh, replicated)
  cache = FeatureCache(cache_dir)

  def features(split):
    def compute():
      batches = data.get_dataset(dataset, split, batch_size=batch_size // jax.process_count(),
                                 image_size=opened.model.image_size, train=False, source=source,
                                 normalization=opened.normalization, crop=opened.crop, crop_pct=opened.crop_pct)
      return compute_features(opened.model, variables, batches, mesh, replicated, step)
    return cache.get_or_compute(_identity(args, opened, dataset, split), compute)

  (train_x, train_y), (test_x, test_y) = features(train_split), features(test_split)
  what = (f"{run['model']['name']} ({args.workdir}{', random init' if args.random_init else ''})" if args.workdir
          else f"{args.model or ''} ({args.weights or 'random init'})")
  print(f"{what} on {dataset}: {len(train_y)} {train_split} / {len(test_y)} {test_split} examples, "
        f"{train_x.shape[1]}-d features")
  results: dict[str, Any] = {"dataset": dataset, "train_examples": len(train_y), "test_examples": len(test_y)}
  try:
    fewshot = fewshot_accuracy(train_x, train_y, test_x, test_y, args.shots, seeds=args.seeds, l2_reg=args.l2_reg)
  except ValueError as e:
    raise SystemExit(str(e))
  results["fewshot"] = {shot: {"mean": float(a.mean()), "std": float(a.std()), "draws": a.tolist()}
                        for shot, a in fewshot.items()}
  print(f"few-shot linear regression ({args.seeds} draws): " + ", ".join(
      f"{shot}-shot {100 * a.mean():.1f} ± {100 * a.std():.1f}%" for shot, a in fewshot.items()))
  if args.knn:
    results["knn"] = knn_accuracy(train_x, train_y, test_x, test_y, args.knn)
    print(f"kNN (cosine, T={KNN_TEMPERATURE}, all of {train_split} as memory): "
          + ", ".join(f"k={k} {100 * a:.1f}%" for k, a in results["knn"].items()))
  if not args.no_probe:
    results["probe"] = linear_probe(train_x, train_y, test_x, test_y)
    print(f"linear probe (logistic regression, C={results['probe']['C']:g} chosen on {PROBE_HOLDOUT:.0%} of "
          f"{train_split}): {100 * results['probe']['accuracy']:.1f}%")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
