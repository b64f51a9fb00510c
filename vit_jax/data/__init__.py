"""Input pipelines (tf.data on CPU) and our TFDS builders.

Public entry point (other tools rely on it):

    it = vit_jax.data.get_dataset(name, split, *, batch_size, image_size, train, seed=0,
                                  data_dir=None, process_index=None, process_count=None)
    # iterator of numpy dicts: image float32 [b, h, w, 3], label int32 [b], mask bool [b]
"""
