"""`python -m vit_jax.predict` on a tiny model, a tiny .npz and JPEGs written by the test."""
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from vit_jax import cli, labels, predict

FIX = pathlib.Path(__file__).parent / "fixtures" / "vit"
TINY = ["--model", "ViT-B_16", "--image-size", "32", "--model-option", "patch_size=8",
        "--model-option", "hidden_size=32", "--model-option", "depth=2", "--model-option", "mlp_dim=64",
        "--model-option", "num_heads=2", "--model-option", "approximate_gelu=False"]


def write_jpeg(path, seed, size=(40, 56)):
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
  Image.fromarray(pixels).save(path, quality=95)
  return str(path)


def printed(out):
  """{image: [(probability, index, name), ...]} from the CLI's output."""
  result, current = {}, None
  for line in out.splitlines():
    m = re.match(r"^\s+([\d.]+)\s+(\d+)\s+(.*)$", line)
    if m:
      result[current].append((float(m.group(1)), int(m.group(2)), m.group(3)))
    else:
      current = line.strip()
      result[current] = []
  return result


def test_top5_of_a_tiny_checkpoint(tmp_path, capsys):
  import jax
  import tensorflow as tf
  import vit_jax
  paths = [write_jpeg(tmp_path / "a.jpg", 0), write_jpeg(tmp_path / "b.jpg", 1)]
  assert predict.main(TINY + ["--weights", str(FIX / "plain_token.official.npz")] + paths) == 0
  got = printed(capsys.readouterr().out)
  assert list(got) == paths and all(len(rows) == 5 for rows in got.values())

  # Reference: official eval preprocessing (bilinear resize, [-1, 1]) and the model, computed here.
  model = vit_jax.get_model("ViT-B_16", num_classes=5, image_size=32, patch_size=8, hidden_size=32, depth=2,
                            mlp_dim=64, num_heads=2, approximate_gelu=False)
  variables = vit_jax.load_pretrained(FIX / "plain_token.official.npz", model=model)
  images = np.stack([tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(p), channels=3), (32, 32)).numpy() / 127.5 - 1
                     for p in paths]).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    probs = np.asarray(jax.nn.softmax(model.apply(variables, images), axis=-1))
  for path, row in zip(paths, probs):
    want = np.argsort(-row)
    assert [i for _, i, _ in got[path]] == list(want)
    np.testing.assert_allclose([p for p, _, _ in got[path]], row[want], atol=1e-4)
    assert got[path][0][2] == f"class {want[0]}"  # 5 classes: no ImageNet names


def test_imagenet_names_for_a_1000_class_head(tmp_path, capsys):
  flat = dict(np.load(FIX / "plain_token.official.npz"))
  flat["head/kernel"] = np.zeros((32, 1000), np.float32)
  flat["head/bias"] = np.zeros(1000, np.float32)
  flat["head/bias"][281], flat["head/bias"][285] = 5.0, 4.0
  np.savez(tmp_path / "imagenet.npz", **flat)
  path = write_jpeg(tmp_path / "cat.jpg", 2)
  predict.main(TINY + ["--weights", str(tmp_path / "imagenet.npz"), "--top-k", "3", path])
  rows = printed(capsys.readouterr().out)[path]
  assert [(i, name) for _, i, name in rows[:2]] == [(281, "tabby, tabby cat"), (285, "Egyptian cat")]
  np.testing.assert_allclose(rows[0][0], np.exp(5) / (np.exp(5) + np.exp(4) + 998), atol=1e-4)


def test_label_files():
  names_1k, names_21k = labels.class_names(1000), labels.class_names(21843)
  assert len(names_1k) == 1000 and names_1k[0] == "tench, Tinca tinca"
  assert len(names_21k) == 21843 and names_21k[0] == "organism, being"
  assert labels.class_names(10) is None


def test_bad_invocations(tmp_path):
  with pytest.raises(SystemExit):
    predict.parse_args(["x.jpg", "--model", "ViT-B_16"])  # no weights
  with pytest.raises(SystemExit, match="cannot read image"):
    predict.main(TINY + ["--weights", str(FIX / "plain_token.official.npz"), str(tmp_path / "missing.jpg")])
  with pytest.raises(SystemExit, match="--model-option expects KEY=VALUE"):
    predict.main(TINY + ["--model-option", "depth", "--weights", str(FIX / "plain_token.official.npz"),
                         str(tmp_path / "x.jpg")])


def test_key_value_options():
  assert cli.parse_key_values(["depth=2", "classifier=gap", "approximate_gelu=False", "patch_size=(4, 4)"],
                              "--model-option") == {"depth": 2, "classifier": "gap", "approximate_gelu": False,
                                                    "patch_size": (4, 4)}
  for bad in ("depth", "=2"):
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
      cli.parse_key_values([bad], "--set")


def test_input_settings_come_from_the_released_weights():
  # Official ViT: plain resize to [-1, 1]; CrossViT (IBM/timm): ImageNet mean/std, crop 0.875;
  # MaxViT: ImageNet mean/std at 224 (crop 0.95), [-1, 1] and resize only at 384.
  vit = predict.input_settings("ViT-B_16", (224, 224))
  assert (vit.normalization, vit.crop_pct, vit.num_classes) == ("minus_one_one", 1.0, 21843)
  assert predict.input_settings("ViT-B_16", (384, 384)).num_classes == 1000
  crossvit = predict.input_settings("CrossViT-S", (240, 240))
  assert (crossvit.normalization, crossvit.crop_pct, crossvit.timm_name) == ("imagenet", 0.875,
                                                                           "crossvit_small_240.in1k")
  maxvit_224, maxvit_384 = (predict.input_settings("MaxViT-T", (s, s)) for s in (224, 384))
  assert (maxvit_224.normalization, maxvit_224.crop_pct) == ("imagenet", 0.95)
  assert (maxvit_384.normalization, maxvit_384.crop_pct) == ("minus_one_one", 1.0)
