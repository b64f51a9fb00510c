"""Orbax checkpoints: restore onto other meshes, corrupt checkpoints, config checks, vit_jax.restore."""
import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import vit_jax
from vit_jax.train import checkpoint as ckpt_lib
from vit_jax.train import config_base, optim, sharding as shd, state as state_lib, trainer


def mesh_of(data, fsdp, tensor):
  return shd.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def mlp_kernel(state):
  return state.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]


@pytest.fixture(scope="module")
def setup(load_config, initial_variables):
  config = load_config()
  config.model.hidden_size = 64  # FSDP over 8 devices shards `embed` (64 / 8)
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config)
  fsdp_mesh = mesh_of(1, 8, 1)
  state = state_lib.create_train_state(model, tx, fsdp_mesh, 0, initial_variables(config))
  return config, model, tx, state


def assert_same_values(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               jax.device_get(a), jax.device_get(b))


def test_restore_onto_other_meshes_and_device_counts(tmp_path, setup):
  config, model, tx, state = setup
  assert mlp_kernel(state).sharding.spec == P("fsdp", None)
  saver = ckpt_lib.Checkpointer(str(tmp_path / "a"))
  saver.save(7, state, {"position": 3}, config)
  saver.close()

  # 8 devices with FSDP -> 1 device.
  one = mesh_of(1, 1, 1)
  abstract_one, _ = state_lib.state_shardings(model, tx, one)
  restored, data_state, step = ckpt_lib.Checkpointer(str(tmp_path / "a")).restore(abstract_one, config)
  assert step == 7 and data_state == {"position": 3}
  assert mlp_kernel(restored).sharding.device_set == {jax.devices()[0]}
  assert_same_values(restored, state)

  # ... and 1 device -> 8 devices on another layout (data 2 x fsdp 2 x tensor 2).
  saver = ckpt_lib.Checkpointer(str(tmp_path / "b"))
  saver.save(8, restored, {"position": 4}, config)
  saver.close()
  abstract_tp, _ = state_lib.state_shardings(model, tx, mesh_of(2, 2, 2))
  back, _, step = ckpt_lib.Checkpointer(str(tmp_path / "b")).restore(abstract_tp, config)
  assert step == 8 and mlp_kernel(back).sharding.spec == P("fsdp", "tensor")
  assert len(mlp_kernel(back).sharding.device_set) == 8
  assert_same_values(back, state)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, setup, caplog):
  config, model, tx, state = setup
  saver = ckpt_lib.Checkpointer(str(tmp_path))
  saver.save(1, state, {"position": 1}, config)
  saver.save(2, state.replace(step=state.step + 2), {"position": 2}, config)
  saver.close()
  # A half-written save (Orbax writes into a temporary folder and renames it when done) is ignored ...
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234").mkdir()
  # ... and a damaged latest checkpoint is set aside.
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  for f in state_dir.rglob("*"):
    if f.is_file() and f.name != "_METADATA":
      f.write_bytes(b"garbage")
  abstract, _ = state_lib.state_shardings(model, tx, mesh_of(1, 8, 1))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    restored, data_state, step = checkpointer.restore(abstract, config)
  assert step == 1 and data_state == {"position": 1} and int(restored.step) == 0
  assert "Checkpoint 2" in caplog.text and "cannot be read" in caplog.text
  assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()
  assert checkpointer.steps() == [1]
  # Training goes on and can write step 2 again.
  checkpointer.save(2, restored, {"position": 2}, config)
  checkpointer.close()
  assert ckpt_lib.Checkpointer(str(tmp_path)).steps() == [1, 2]


def test_checkpoint_of_another_config_is_named(tmp_path, setup, load_config):
  config, model, tx, state = setup
  saver = ckpt_lib.Checkpointer(str(tmp_path))
  saver.save(1, state, {}, config)
  saver.close()
  other = load_config()
  other.model.hidden_size = 32
  other.lr = 0.5
  other.checkpoint_every = 3  # operational keys may change on resume
  abstract, _ = state_lib.state_shardings(trainer.build_model(other), tx, mesh_of(1, 1, 1))
  with pytest.raises(ckpt_lib.ConfigMismatchError) as info:
    ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, other)
  message = str(info.value)
  assert "model.hidden_size: checkpoint 64, now 32" in message and "lr: checkpoint 0.003, now 0.5" in message
  assert "checkpoint_every" not in message


def test_vit_jax_restore_gives_a_ready_model(tmp_path, setup):
  config, model, tx, state = setup
  saver = ckpt_lib.Checkpointer(str(tmp_path))
  saver.save(5, state, {}, config)
  saver.close()
  restored_model, variables, restored_config = vit_jax.restore(str(tmp_path))
  assert restored_config.model.hidden_size == 64 and restored_model.num_classes == 10
  assert set(variables) == {"params"}
  assert_same_values(variables["params"], state.params)
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  logits = jax.jit(lambda v, x: restored_model.apply(v, x, train=False))(variables, images)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  with pytest.raises(ValueError, match="available steps: \\[5\\]"):
    vit_jax.restore(str(tmp_path), step=4)
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    vit_jax.restore(str(tmp_path / "nothing"))


def test_predict_cli_restores_a_workdir(tmp_path, setup, capsys, with_random_head):
  """`python -m vit_jax.predict --workdir` prints the restored model's own top-5 probabilities."""
  from PIL import Image
  from vit_jax import predict
  config, model, tx, state = setup
  # A fresh head is zero (uniform probabilities); a random one makes the ranking depend on the input.
  state = state.replace(params=with_random_head({"params": state.params}, 2)["params"])
  saver = ckpt_lib.Checkpointer(str(tmp_path / "run"))
  saver.save(5, state, {}, config)
  saver.close()
  pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "digit.png")
  assert predict.main(["--workdir", str(tmp_path / "run"), str(tmp_path / "digit.png")]) == 0
  printed = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
  images = (pixels[None].astype(np.float32) - 127.5) / 127.5  # the pipeline's default [-1, 1]
  logits = model.apply({"params": state.params}, images, train=False)
  probs = np.asarray(jax.nn.softmax(logits[0]))
  top5 = np.argsort(-probs)[:5]
  assert [int(row[1]) for row in printed] == top5.tolist()
  np.testing.assert_allclose([float(row[0]) for row in printed], probs[top5], atol=1e-4)


def test_keys_added_since_a_checkpoint_count_as_their_defaults():
  current = ckpt_lib.config_to_json(config_base.base_config())
  saved = {k: v for k, v in current.items() if k != "total_epochs"}  # written before the key existed
  assert ckpt_lib.config_differences(saved, current) == []
  changed = dict(current, total_epochs=3, total_steps=None)
  assert ckpt_lib.config_differences(saved, changed) == [
      f"total_epochs: checkpoint {current['total_epochs']!r}, now 3",
      f"total_steps: checkpoint {current['total_steps']!r}, now None"]
