"""Regenerates the class-name files of this folder from WordNet facts shipped with timm.

    python -m vit_jax.labels.build_labels [TIMM_INFO_DIR]

Inputs (timm/data/_info/): `imagenet_synsets.txt` (ImageNet-1k class order),
`imagenet21k_goog_synsets.txt` (the 21,843-class order of Google's ImageNet-21k
checkpoints, as vision_transformer uses it) and `imagenet_synset_to_lemma.txt`.
Output lines: `<synset>\t<lemmas>`, line i = class i.
"""
import pathlib
import sys

HERE = pathlib.Path(__file__).parent
OUTPUTS = {"imagenet1k.txt": "imagenet_synsets.txt", "imagenet21k.txt": "imagenet21k_goog_synsets.txt"}


def main(info_dir: str | None = None) -> None:
  if info_dir is None:
    import timm.data
    info_dir = pathlib.Path(timm.data.__file__).parent / "_info"
  info_dir = pathlib.Path(info_dir)
  lemmas = dict(line.split("\t", 1) for line in (info_dir / "imagenet_synset_to_lemma.txt").read_text().splitlines())
  for out, synset_file in OUTPUTS.items():
    synsets = (info_dir / synset_file).read_text().split()
    (HERE / out).write_text("".join(f"{s}\t{lemmas[s]}\n" for s in synsets))
    print(out, len(synsets))


if __name__ == "__main__":
  main(*sys.argv[1:])
