"""Sharded training, fine-tuning and Orbax checkpoints (entry point: `python -m vit_jax.main`).

  sharding     mesh (data, fsdp, tensor) and logical-axis rules for the models' parameter annotations
  state        TrainState, created directly in its sharded layout
  step         jitted train step (accumulation, mixup, label smoothing) and eval step
  optim        optimisers (sgd / adam / adamw) and learning-rate schedules of the reference recipes
  checkpoint   Orbax CheckpointManager wrapper, exact resume, `vit_jax.restore`
  metrics      terminal progress, TensorBoard scalars (clu), metrics.jsonl
  trainer      the train loop `train_and_evaluate(config, workdir)`
  config_base  the keys every config in configs/ has
  synthetic    `dataset="synthetic"`: learnable random data for smoke runs and multi-process tests
"""
