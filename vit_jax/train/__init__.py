"""Sharded training, fine-tuning and Orbax checkpoints (entry point: `python -m vit_jax.main`).

  config_base  the keys every config in configs/ has, durations in steps/epochs/examples, build_model
  sharding     mesh (data, fsdp, tensor) and logical-axis rules for the models' parameter annotations
  state        TrainState, created directly in its sharded layout
  step         jitted train step (accumulation, mixup, label smoothing) and eval step
  optim        optimisers (sgd / adam / adamw) and learning-rate schedules of the reference recipes
  checkpoint   Orbax CheckpointManager wrapper, exact resume (read back by `vit_jax.restore`, in vit_jax.predict);
               checksums, what counts as a corrupt checkpoint, write failures
  lock         one run per workdir (a lock file that a killed run does not leave stuck)
  multihost    what the processes of a multi-process run exchange
  metrics      terminal progress, TensorBoard scalars (clu), metrics.jsonl
  trainer      the train loop `train_and_evaluate(config, workdir)`

Imports go one way: config_base <- checkpoint, trainer; trainer -> checkpoint.  The synthetic
data set is `vit_jax.data.synthetic`.
"""
