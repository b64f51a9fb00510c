"""The catalogue of released checkpoints: one entry per public file, and the one place for per-release settings.

    import vit_jax
    vit_jax.list_pretrained("timm/vit_base*")          # names, by pattern / model / source
    vit_jax.pretrained_info("vit_models/imagenet21k/ViT-B_16")   # the entry (a `Pretrained`)
    model, variables = vit_jax.load_model("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")

A catalogue name is the checkpoint's public location without its scheme and file extension:
the bucket path for Google's buckets (`vit_models/imagenet21k/ViT-B_16`,
`vit_models/augreg/<file>`, `big_vision/siglip/<file>:img`, `gresearch/maxvit/ckpts/...`), the
hub repository for Hugging Face (`timm/<arch>.<tag>`, `google/vit-base-patch16-224`) and
`IBM/CrossViT/<file>` for the official CrossViT release.  Each entry holds our model name and
options, the source URL(s) (tried in order), the evaluation input settings (image size, crop,
interpolation, mean/std), the class count and label set, the ImageNet-1k top-1 its authors (or,
for timm's ports, timm's results table) report, and a sha256 where one is pinned (downloads are
also checked against the checksum the server publishes: GCS `x-goog-hash` md5, the hub's sha256).

`registry.pretrained_cfgs(model)` and `vit_jax.predict` read their input settings from here.
Any AugReg file of `gs://vit_models/augreg/index.csv` (>50k) is understood from its name
(`augreg_entry`), not only the ones listed here.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from typing import Any

from vit_jax.models import registry

IMAGENET, INCEPTION = registry.IMAGENET_MEAN, registry.INCEPTION_MEAN  # std: see _STD
_STD = {IMAGENET: registry.IMAGENET_STD, INCEPTION: registry.INCEPTION_STD}

# Label sets and their class counts (0: the checkpoint has no classifier head, the model returns features).
LABELS = {"imagenet1k": 1000, "imagenet21k": 21843, "none": 0, "cifar100": 100, "oxford_iiit_pet": 37,
          "resisc45": 45, "kitti": 4}
SOURCES = ("official", "timm", "transformers", "augreg", "big_vision", "ibm", "maxvit_tf")


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """One released checkpoint (also the input settings `registry.pretrained_cfgs` returns, as timm's
  `pretrained_cfg`)."""
  name: str
  model: str                                     # our registered model name
  urls: tuple[str, ...]                          # gs://, https://, hf-hub:; the first that exists is used
  image_size: int
  num_classes: int = 1000                        # 0: no head
  labels: str = "imagenet1k"
  options: tuple[tuple[str, Any], ...] = ()      # model fields on top of the variant's
  crop_pct: float = 1.0                          # central crop of the resized image (1.0: resize only)
  interpolation: str = "bilinear"
  mean: tuple[float, float, float] = INCEPTION
  std: tuple[float, float, float] = registry.INCEPTION_STD
  top1: float | None = None                      # ImageNet-1k top-1 (%) as reported by `top1_ref`
  top1_ref: str | None = None
  sha256: str | None = None
  source: str = ""
  tag: str = ""                                  # the release, e.g. timm's "augreg2_in21k_ft_in1k"
  timm_name: str | None = None                   # timm's `architecture.tag` of the same weights
  subtree: str | None = None                     # part of a multi-model checkpoint ("img": SigLIP image tower)

  @property
  def normalization(self) -> str:
    """The name `vit_jax.data` uses for this mean/std ('minus_one_one' or 'imagenet')."""
    if (self.mean, self.std) == (INCEPTION, registry.INCEPTION_STD):
      return "minus_one_one"
    if (self.mean, self.std) == (IMAGENET, registry.IMAGENET_STD):
      return "imagenet"
    raise ValueError(f"no vit_jax.data normalisation for mean {self.mean}, std {self.std}.")

  def model_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `vit_jax.get_model(self.model, ...)` that build the checkpoint's model."""
    return dict(self.options, image_size=self.image_size, num_classes=self.num_classes)


def _entry(name, model, urls, image_size, *, mean=INCEPTION, options=None, **kw) -> Pretrained:
  urls = (urls,) if isinstance(urls, str) else tuple(urls)
  return Pretrained(name=name, model=model, urls=urls, image_size=image_size, mean=mean, std=_STD[mean],
                    options=tuple(sorted((options or {}).items())), **kw)


# ----------------------------------------------------------------------------- official ViT (gs://vit_models)

def _hidden(model: str) -> int:
  return registry.get_family(model).variants[model]["hidden_size"]


# timm's ports of the same files (timm/<name> on the hub); top-1 from timm's results table where it evaluated them.
_OFFICIAL_TIMM = {
    ("imagenet21k+imagenet2012", "ViT-B_16"): ("vit_base_patch16_384.orig_in21k_ft_in1k", 84.212),
    ("imagenet21k+imagenet2012", "ViT-L_32"): ("vit_large_patch32_384.orig_in21k_ft_in1k", 81.508),
    ("imagenet21k+imagenet2012", "R50+ViT-B_16"): ("vit_base_r50_s16_384.orig_in21k_ft_in1k", 84.988),
    ("imagenet21k+imagenet2012", "ViT-B_16-224"): ("vit_base_patch16_224.orig_in21k_ft_in1k", None),
    ("sam", "ViT-B_16"): ("vit_base_patch16_224.sam_in1k", 80.246),
    ("sam", "ViT-B_32"): ("vit_base_patch32_224.sam_in1k", 73.704),
}
# The official README: "-224" fine-tunes "are expected to achieve 81.2% and 82.7% top-1".
_OFFICIAL_README_TOP1 = {"ViT-B_16-224": 81.2, "ViT-L_16-224": 82.7}


def _official() -> list[Pretrained]:
  out = []
  # Bucket listing of the official Colab (vit_jax.ipynb).  ImageNet-21k checkpoints keep the
  # representation layer (pre_logits) of pre-training and a 21,843-class head.
  for model in ("ViT-B_16", "ViT-B_32", "ViT-B_8", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50+ViT-B_16",
                "R26+ViT-B_32", "R50+ViT-L_32"):
    out.append(_entry(f"vit_models/imagenet21k/{model}", model, f"gs://vit_models/imagenet21k/{model}.npz", 224,
                      num_classes=21843, labels="imagenet21k", options={"representation_size": _hidden(model)},
                      source="official", tag="imagenet21k"))
  for file in ("ViT-B_16", "ViT-B_32", "ViT-B_8", "ViT-L_16", "ViT-L_32", "R50+ViT-B_16", "ViT-B_16-224",
               "ViT-L_16-224"):
    model = file.removesuffix("-224")
    timm_name, top1 = _OFFICIAL_TIMM.get(("imagenet21k+imagenet2012", file), (None, None))
    ref = "timm results-imagenet.csv" if top1 else None
    if file in _OFFICIAL_README_TOP1:
      top1, ref = _OFFICIAL_README_TOP1[file], "official README"
    out.append(_entry(f"vit_models/imagenet21k+imagenet2012/{file}", model,
                      f"gs://vit_models/imagenet21k+imagenet2012/{file}.npz", 224 if file.endswith("-224") else 384,
                      source="official", tag="imagenet21k+imagenet2012", timm_name=timm_name, top1=top1,
                      top1_ref=ref))
  for model in ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-S_16"):  # SAM: ImageNet-1k from scratch
    timm_name, top1 = _OFFICIAL_TIMM.get(("sam", model), (None, None))
    out.append(_entry(f"vit_models/sam/{model}", model, f"gs://vit_models/sam/{model}.npz", 224, source="official",
                      tag="sam", timm_name=timm_name, top1=top1, top1_ref="timm results-imagenet.csv" if top1 else None))
  return out


# ----------------------------------------------------------------------------- AugReg (gs://vit_models/augreg)

_AUGREG_MODELS = {"Ti_16": "ViT-Ti_16", "S_16": "ViT-S_16", "S_32": "ViT-S_32", "B_8": "ViT-B_8",
                  "B_16": "ViT-B_16", "B_32": "ViT-B_32", "L_16": "ViT-L_16", "R_Ti_16": "R+ViT-Ti_16",
                  "R26_S_32": "R26+ViT-S_32", "R50_L_32": "R50+ViT-L_32"}
_AUGREG_UPSTREAM = {"i21k": ("imagenet21k", 21843), "i21k_30": ("imagenet21k", 21843), "i1k": ("imagenet1k", 1000)}
_AUGREG_ADAPT = {"imagenet2012": "imagenet1k", "cifar100": "cifar100", "oxford_iiit_pet": "oxford_iiit_pet",
                 "resisc45": "resisc45", "kitti": "kitti"}
_AUGREG_RE = re.compile(
    r"^(?P<model>R_Ti_16|R26_S_32|R50_L_32|Ti_16|S_16|S_32|B_8|B_16|B_32|L_16)-(?P<ds>i21k_30|i21k|i1k)-\d+ep-"
    r"lr_[\d.]+-aug_\w+?-wd_[\d.]+-do_[\d.]+-sd_[\d.]+"
    r"(?:--(?P<adapt>[a-z0-9_]+)-steps_\w+?-lr_[\d.]+-res_(?P<res>\d+))?$")

# The README's recommended checkpoints (best i21k upstream validation) with their ImageNet top-1 at 384 px,
# the AugReg files timm ported, and big_vision's "howto-i21k-B/8".
_AUGREG_README = {
    "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0": ("steps_20k-lr_0.01-res_384", 85.59),
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0": ("steps_20k-lr_0.03-res_384", 85.49),
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0": ("steps_20k-lr_0.03-res_384", 83.73),
    "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1": ("steps_20k-lr_0.01-res_384", 85.99),
    "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0": ("steps_20k-lr_0.01-res_384", 83.85),
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0": ("steps_20k-lr_0.03-res_384", 78.22),
    "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0": ("steps_20k-lr_0.01-res_384", 83.59),
    "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0": ("steps_20k-lr_0.01-res_384", 79.58),
    "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0": ("steps_20k-lr_0.03-res_384", 75.40),
}
_AUGREG_OTHER = ("B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",)  # big_vision "howto-i21k-B/8"


def augreg_entry(filename: str) -> Pretrained:
  """The entry of any AugReg file (`[gs://vit_models/augreg/]NAME[.npz]`, e.g. from index.csv), from its name.

  Upstream checkpoints: 224 px, ImageNet-21k (21,843 classes) or -1k heads; `--<dataset>-...-res_<R>`
  fine-tunes: the data set's classes at R px.  Evaluated as the official code does: plain resize to
  [-1, 1].
  """
  stem = filename.removeprefix("gs://").removeprefix("vit_models/augreg/").removesuffix(".npz")
  m = _AUGREG_RE.match(stem)
  if not m:
    raise ValueError(f"{filename!r} is not an AugReg checkpoint name "
                     "(MODEL-DS-300ep-lr_X-aug_X-wd_X-do_X-sd_X[--DATASET-steps_X-lr_X-res_R]).")
  labels, classes = _AUGREG_UPSTREAM[m["ds"]]
  size = 224
  if m["adapt"]:
    if m["adapt"] not in _AUGREG_ADAPT:
      raise ValueError(f"AugReg fine-tune data set {m['adapt']!r} is not one of {sorted(_AUGREG_ADAPT)}.")
    labels = _AUGREG_ADAPT[m["adapt"]]
    classes, size = LABELS[labels], int(m["res"])
  top1 = None
  upstream = stem.split("--")[0]
  if upstream in _AUGREG_README and stem.endswith("--imagenet2012-" + _AUGREG_README[upstream][0]):
    top1 = _AUGREG_README[upstream][1]
  return _entry(f"vit_models/augreg/{stem}", _AUGREG_MODELS[m["model"]], f"gs://vit_models/augreg/{stem}.npz",
                size, num_classes=classes, labels=labels, source="augreg", tag=m["ds"] + (
                    f"_ft_{m['adapt']}_{size}" if m["adapt"] else ""),
                timm_name=_timm_augreg().get(stem), top1=top1, top1_ref="official README" if top1 else None)


def _augreg() -> list[Pretrained]:
  names = []
  for upstream, (finetune, _) in _AUGREG_README.items():
    names += [upstream, f"{upstream}--imagenet2012-{finetune}"]
  names += list(_AUGREG_OTHER) + list(_timm_augreg())
  return [augreg_entry(n) for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------- timm (hf-hub:timm/...)

# timm's pretrained_cfg (timm 1.0.31) of every weight of an architecture we implement:
# (architecture.tag, input size, classes (0: no head), crop_pct, mean (std alike), ImageNet top-1 of timm's
# results-imagenet.csv).  All bicubic.  The AugReg files they were converted from: _TIMM_AUGREG.
_TIMM = (
    ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 75.452),
    ("vit_tiny_patch16_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_tiny_patch16_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 78.438),
    ("vit_small_patch8_224.dino", 224, 0, 0.9, IMAGENET, None),
    ("vit_small_patch16_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 81.402),
    ("vit_small_patch16_224.augreg_in1k", 224, 1000, 0.9, INCEPTION, 78.842),
    ("vit_small_patch16_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_small_patch16_224.dino", 224, 0, 0.9, IMAGENET, None),
    ("vit_small_patch16_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 83.814),
    ("vit_small_patch16_384.augreg_in1k", 384, 1000, 1.0, INCEPTION, 81.13),
    ("vit_small_patch32_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 76.01),
    ("vit_small_patch32_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_small_patch32_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 80.476),
    ("vit_base_patch8_224.augreg2_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 86.252),
    ("vit_base_patch8_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 85.838),
    ("vit_base_patch8_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_base_patch8_224.dino", 224, 0, 0.9, IMAGENET, None),
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 85.108),
    ("vit_base_patch16_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 84.534),
    ("vit_base_patch16_224.orig_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 81.782),
    ("vit_base_patch16_224.augreg_in1k", 224, 1000, 0.9, INCEPTION, 79.154),
    ("vit_base_patch16_224.orig_in21k", 224, 0, 0.9, INCEPTION, None),
    ("vit_base_patch16_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_base_patch16_224.sam_in1k", 224, 1000, 0.9, INCEPTION, 80.246),
    ("vit_base_patch16_224.dino", 224, 0, 0.9, IMAGENET, None),
    ("vit_base_patch16_224.mae", 224, 0, 0.9, IMAGENET, None),
    ("vit_base_patch16_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 86.01),
    ("vit_base_patch16_384.orig_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 84.212),
    ("vit_base_patch16_384.augreg_in1k", 384, 1000, 1.0, INCEPTION, 81.102),
    ("vit_base_patch32_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 80.732),
    ("vit_base_patch32_224.augreg_in1k", 224, 1000, 0.9, INCEPTION, 74.908),
    ("vit_base_patch32_224.orig_in21k", 224, 0, 0.9, INCEPTION, None),
    ("vit_base_patch32_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_base_patch32_224.sam_in1k", 224, 1000, 0.9, INCEPTION, 73.704),
    ("vit_base_patch32_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 83.358),
    ("vit_base_patch32_384.augreg_in1k", 384, 1000, 1.0, INCEPTION, 78.75),
    ("vit_large_patch16_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 85.856),
    ("vit_large_patch16_224.orig_in21k", 224, 0, 0.9, INCEPTION, None),
    ("vit_large_patch16_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_large_patch16_224.mae", 224, 0, 0.9, IMAGENET, None),
    ("vit_large_patch16_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 87.096),
    ("vit_large_patch32_224.orig_in21k", 224, 0, 0.9, INCEPTION, None),
    ("vit_large_patch32_384.orig_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 81.508),
    ("vit_huge_patch14_224.orig_in21k", 224, 0, 0.9, INCEPTION, None),
    ("vit_huge_patch14_224.mae", 224, 0, 0.9, IMAGENET, None),
    ("vit_tiny_r_s16_p8_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 71.8),
    ("vit_tiny_r_s16_p8_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_tiny_r_s16_p8_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 75.962),
    ("vit_small_r26_s32_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 81.856),
    ("vit_small_r26_s32_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_small_r26_s32_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 84.066),
    ("vit_base_r50_s16_224.orig_in21k", 224, 0, 0.9, INCEPTION, None),
    ("vit_base_r50_s16_384.orig_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 84.988),
    ("vit_large_r50_s32_224.augreg_in21k_ft_in1k", 224, 1000, 0.9, INCEPTION, 84.434),
    ("vit_large_r50_s32_224.augreg_in21k", 224, 21843, 0.9, INCEPTION, None),
    ("vit_large_r50_s32_384.augreg_in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 86.188),
    ("crossvit_tiny_240.in1k", 240, 1000, 0.875, IMAGENET, 73.352),
    ("crossvit_small_240.in1k", 240, 1000, 0.875, IMAGENET, 81.036),
    ("crossvit_base_240.in1k", 240, 1000, 0.875, IMAGENET, 82.212),
    ("crossvit_9_240.in1k", 240, 1000, 0.875, IMAGENET, 73.994),
    ("crossvit_15_240.in1k", 240, 1000, 0.875, IMAGENET, 81.522),
    ("crossvit_18_240.in1k", 240, 1000, 0.875, IMAGENET, 82.39),
    ("crossvit_9_dagger_240.in1k", 240, 1000, 0.875, IMAGENET, 76.99),
    ("crossvit_15_dagger_240.in1k", 240, 1000, 0.875, IMAGENET, 82.302),
    ("crossvit_15_dagger_408.in1k", 408, 1000, 1.0, IMAGENET, 83.842),
    ("crossvit_18_dagger_240.in1k", 240, 1000, 0.875, IMAGENET, 82.494),
    ("crossvit_18_dagger_408.in1k", 408, 1000, 1.0, IMAGENET, 84.198),
    ("maxvit_tiny_tf_224.in1k", 224, 1000, 0.95, IMAGENET, 83.426),
    ("maxvit_tiny_tf_384.in1k", 384, 1000, 1.0, INCEPTION, 85.106),
    ("maxvit_tiny_tf_512.in1k", 512, 1000, 1.0, INCEPTION, 85.658),
    ("maxvit_small_tf_224.in1k", 224, 1000, 0.95, IMAGENET, 84.452),
    ("maxvit_small_tf_384.in1k", 384, 1000, 1.0, INCEPTION, 85.534),
    ("maxvit_small_tf_512.in1k", 512, 1000, 1.0, INCEPTION, 86.102),
    ("maxvit_base_tf_224.in1k", 224, 1000, 0.95, IMAGENET, 84.884),
    ("maxvit_base_tf_224.in21k", 224, 21843, 0.95, INCEPTION, None),
    ("maxvit_base_tf_384.in1k", 384, 1000, 1.0, INCEPTION, 86.29),
    ("maxvit_base_tf_384.in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 87.93),
    ("maxvit_base_tf_512.in1k", 512, 1000, 1.0, INCEPTION, 86.598),
    ("maxvit_base_tf_512.in21k_ft_in1k", 512, 1000, 1.0, INCEPTION, 88.214),
    ("maxvit_large_tf_224.in1k", 224, 1000, 0.95, IMAGENET, 84.938),
    ("maxvit_large_tf_224.in21k", 224, 21843, 0.95, INCEPTION, None),
    ("maxvit_large_tf_384.in1k", 384, 1000, 1.0, INCEPTION, 86.242),
    ("maxvit_large_tf_384.in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 87.994),
    ("maxvit_large_tf_512.in1k", 512, 1000, 1.0, INCEPTION, 86.534),
    ("maxvit_large_tf_512.in21k_ft_in1k", 512, 1000, 1.0, INCEPTION, 88.236),
    ("maxvit_xlarge_tf_224.in21k", 224, 21843, 0.95, INCEPTION, None),
    ("maxvit_xlarge_tf_384.in21k_ft_in1k", 384, 1000, 1.0, INCEPTION, 88.302),
    ("maxvit_xlarge_tf_512.in21k_ft_in1k", 512, 1000, 1.0, INCEPTION, 88.54),
)

# timm architecture -> (our model, options); every timm ViT uses the exact (erf) GELU.
_TIMM_ARCH = {
    "vit_tiny_patch16": ("ViT-Ti_16", {}), "vit_small_patch16": ("ViT-S_16", {}),
    "vit_small_patch32": ("ViT-S_32", {}), "vit_small_patch8": ("ViT-S_16", {"patch_size": 8}),
    "vit_base_patch8": ("ViT-B_8", {}), "vit_base_patch16": ("ViT-B_16", {}), "vit_base_patch32": ("ViT-B_32", {}),
    "vit_large_patch16": ("ViT-L_16", {}), "vit_large_patch32": ("ViT-L_32", {}), "vit_huge_patch14": ("ViT-H_14", {}),
    "vit_tiny_r_s16_p8": ("R+ViT-Ti_16", {}), "vit_small_r26_s32": ("R26+ViT-S_32", {}),
    "vit_base_r50_s16": ("R50+ViT-B_16", {}), "vit_large_r50_s32": ("R50+ViT-L_32", {}),
    "crossvit_tiny": ("CrossViT-Ti", None), "crossvit_small": ("CrossViT-S", None),
    "crossvit_base": ("CrossViT-B", None), "crossvit_9": ("CrossViT-9", None), "crossvit_15": ("CrossViT-15", None),
    "crossvit_18": ("CrossViT-18", None), "crossvit_9_dagger": ("CrossViT-9-dagger", None),
    "crossvit_15_dagger": ("CrossViT-15-dagger", None), "crossvit_18_dagger": ("CrossViT-18-dagger", None),
    "maxvit_tiny_tf": ("MaxViT-T", None), "maxvit_small_tf": ("MaxViT-S", None), "maxvit_base_tf": ("MaxViT-B", None),
    "maxvit_large_tf": ("MaxViT-L", None), "maxvit_xlarge_tf": ("MaxViT-XL", None),
}
# The AugReg / SAM files timm converted (its pretrained_cfg `url`), by timm name.
_TIMM_AUGREG = {
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224",
    "vit_tiny_patch16_224.augreg_in21k": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "vit_tiny_patch16_384.augreg_in21k_ft_in1k": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384",
    "vit_small_patch16_224.augreg_in21k_ft_in1k": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224",
    "vit_small_patch16_224.augreg_in1k": "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224",
    "vit_small_patch16_224.augreg_in21k": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "vit_small_patch16_384.augreg_in21k_ft_in1k": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384",
    "vit_small_patch16_384.augreg_in1k": "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384",
    "vit_small_patch32_224.augreg_in21k_ft_in1k": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224",
    "vit_small_patch32_224.augreg_in21k": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "vit_small_patch32_384.augreg_in21k_ft_in1k": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384",
    "vit_base_patch8_224.augreg_in21k_ft_in1k": "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224",
    "vit_base_patch8_224.augreg_in21k": "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "vit_base_patch16_224.augreg_in21k_ft_in1k": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224",
    "vit_base_patch16_224.augreg_in1k": "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224",
    "vit_base_patch16_224.augreg_in21k": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "vit_base_patch16_384.augreg_in21k_ft_in1k": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384",
    "vit_base_patch16_384.augreg_in1k": "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384",
    "vit_base_patch32_224.augreg_in21k_ft_in1k": "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224",
    "vit_base_patch32_224.augreg_in1k": "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224",
    "vit_base_patch32_224.augreg_in21k": "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0",
    "vit_base_patch32_384.augreg_in21k_ft_in1k": "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384",
    "vit_base_patch32_384.augreg_in1k": "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384",
    "vit_large_patch16_224.augreg_in21k_ft_in1k": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224",
    "vit_large_patch16_224.augreg_in21k": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
    "vit_large_patch16_384.augreg_in21k_ft_in1k": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384",
    "vit_tiny_r_s16_p8_224.augreg_in21k_ft_in1k": "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224",
    "vit_tiny_r_s16_p8_224.augreg_in21k": "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "vit_tiny_r_s16_p8_384.augreg_in21k_ft_in1k": "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384",
    "vit_small_r26_s32_224.augreg_in21k_ft_in1k": "R26_S_32-i21k-300ep-lr_0.001-aug_light0-wd_0.03-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.03-res_224",
    "vit_small_r26_s32_224.augreg_in21k": "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0",
    "vit_small_r26_s32_384.augreg_in21k_ft_in1k": "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384",
    "vit_large_r50_s32_224.augreg_in21k_ft_in1k": "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224",
    "vit_large_r50_s32_224.augreg_in21k": "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
    "vit_large_r50_s32_384.augreg_in21k_ft_in1k": "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384",
}


@functools.cache
def _timm_augreg() -> dict[str, str]:
  """AugReg file stem -> timm name of its port."""
  return {stem: name for name, stem in _TIMM_AUGREG.items()}


def _timm_arch(name: str) -> tuple[str, dict[str, Any], str]:
  """'vit_base_patch16_384.augreg_in1k' -> ('ViT-B_16', options, tag)."""
  arch, tag = name.split(".", 1)
  base = re.sub(r"_(224|240|384|408|512)$", "", arch)
  model, options = _TIMM_ARCH[base]
  if options is not None:  # the ViT family: timm's exact GELU
    options = dict(options, approximate_gelu=False)
  return model, options or {}, tag


def _timm() -> list[Pretrained]:
  out = []
  for name, size, classes, crop, mean, top1 in _TIMM:
    model, options, tag = _timm_arch(name)
    labels = {0: "none", 1000: "imagenet1k", 21843: "imagenet21k"}[classes]
    out.append(_entry(f"timm/{name}", model, f"hf-hub:timm/{name}/model.safetensors", size, mean=mean,
                      num_classes=classes, labels=labels, options=options, crop_pct=crop, interpolation="bicubic",
                      source="timm", tag=tag, timm_name=name, top1=top1,
                      top1_ref="timm results-imagenet.csv" if top1 else None))
  return out


# ----------------------------------------------------------------------------- Hugging Face transformers

# google/vit-*: converted from the official files; ViTImageProcessor: plain bilinear resize, mean = std = 0.5.
# The ImageNet-21k repositories are `ViTModel`s with the pre-training representation layer (the pooler) and
# no head ("zero'd by Google researchers" - model card).
_HF = (("vit-base-patch16-224", "ViT-B_16", 224, False), ("vit-base-patch16-384", "ViT-B_16", 384, False),
       ("vit-base-patch32-384", "ViT-B_32", 384, False), ("vit-large-patch16-224", "ViT-L_16", 224, False),
       ("vit-large-patch16-384", "ViT-L_16", 384, False), ("vit-large-patch32-384", "ViT-L_32", 384, False),
       ("vit-base-patch16-224-in21k", "ViT-B_16", 224, True), ("vit-base-patch32-224-in21k", "ViT-B_32", 224, True),
       ("vit-large-patch16-224-in21k", "ViT-L_16", 224, True), ("vit-large-patch32-224-in21k", "ViT-L_32", 224, True),
       ("vit-huge-patch14-224-in21k", "ViT-H_14", 224, True))


def _transformers() -> list[Pretrained]:
  out = []
  for repo, model, size, in21k in _HF:
    files = tuple(f"hf-hub:google/{repo}/{f}" for f in ("model.safetensors", "pytorch_model.bin"))
    options = {"approximate_gelu": False}  # hidden_act "gelu"
    if in21k:
      options["representation_size"] = _hidden(model)
    out.append(_entry(f"google/{repo}", model, files, size, num_classes=0 if in21k else 1000,
                      labels="none" if in21k else "imagenet1k", options=options, source="transformers",
                      tag="in21k" if in21k else "in21k_ft_in1k"))
  return out


# ----------------------------------------------------------------------------- big_vision (gs://big_vision)

_SIGLIP_WIDTHS = {  # big_vision decode_variant
    "B": {}, "L": {}, "So400m": dict(hidden_size=1152, depth=27, mlp_dim=4304, num_heads=16),
    "g-opt": dict(hidden_size=1536, depth=40, mlp_dim=6144, num_heads=16)}
# big_vision's VANITY_NAMES (models/vit.py): SigLIP / SigLIP 2 image towers, (variant, patch, size, file).
# So400m/14 at 384 px is left out: 384 is no multiple of 14 (big_vision's VALID conv drops 6 pixels).
_SIGLIP = (
    ("siglip", "B", 16, 224, "webli_en_b16_224_63724782"), ("siglip", "B", 16, 256, "webli_en_b16_256_60500360"),
    ("siglip", "B", 16, 384, "webli_en_b16_384_68578854"), ("siglip", "B", 16, 512, "webli_en_b16_512_68580893"),
    ("siglip", "L", 16, 256, "webli_en_l16_256_60552751"), ("siglip", "L", 16, 384, "webli_en_l16_384_63634585"),
    ("siglip", "So400m", 14, 224, "webli_en_so400m_224_57633886"),
    ("siglip", "B", 16, 256, "webli_i18n_b16_256_66117334"),
    ("siglip2", "B", 16, 224, "siglip2_b16_224"), ("siglip2", "B", 16, 256, "siglip2_b16_256"),
    ("siglip2", "B", 16, 384, "siglip2_b16_384"), ("siglip2", "B", 16, 512, "siglip2_b16_512"),
    ("siglip2", "B", 32, 256, "siglip2_b32_256"), ("siglip2", "L", 16, 256, "siglip2_l16_256"),
    ("siglip2", "L", 16, 384, "siglip2_l16_384"), ("siglip2", "L", 16, 512, "siglip2_l16_512"),
    ("siglip2", "So400m", 14, 224, "siglip2_so400m14_224"), ("siglip2", "So400m", 16, 256, "siglip2_so400m16_256"),
    ("siglip2", "So400m", 16, 384, "siglip2_so400m16_384"), ("siglip2", "So400m", 16, 512, "siglip2_so400m16_512"),
    ("siglip2", "g-opt", 16, 256, "siglip2_g-opt16_256"), ("siglip2", "g-opt", 16, 384, "siglip2_g-opt16_384"),
)


def _big_vision() -> list[Pretrained]:
  out = []
  # "Better plain ViT baselines for ImageNet-1k" (configs/vit_s16_i1k.py): S/16, gap, sincos2d, rep_size=True;
  # eval resize_small(256)|central_crop(224)|value_range(-1, 1).  README: 76.5% after 90 epochs.
  for epochs, top1 in ((90, 76.5), (150, None), (300, None)):
    out.append(_entry(f"big_vision/vit_s16_i1k_{epochs}ep", "ViT-S_16", f"gs://big_vision/vit_s16_i1k_{epochs}ep.npz",
                      224, crop_pct=0.875, options=dict(classifier="gap", posemb="sincos2d", representation_size=384),
                      source="big_vision", tag=f"i1k_{epochs}ep", top1=top1, top1_ref="big_vision README" if top1 else None))
  for project, variant, patch, size, file in _SIGLIP:
    model = {("B", 16): "ViT-B_16", ("B", 32): "ViT-B_32", ("L", 16): "ViT-L_16"}.get((variant, patch), "ViT-B_16")
    options = dict(_SIGLIP_WIDTHS[variant], classifier="map")  # So400m, g-opt: widths on top of ViT-B_16
    if patch != int(model[-2:]):
      options["patch_size"] = patch
    out.append(_entry(f"big_vision/{project}/{file}:img", model, f"gs://big_vision/{project}/{file}.npz", size,
                      num_classes=0, labels="none", options=options, source="big_vision", tag=project,
                      subtree="img"))
  return out


# ----------------------------------------------------------------------------- official CrossViT (IBM)

# Paper top-1 (ImageNet-1k); timm's `_240` / `_408` are the same weights.
_IBM = (("tiny", "CrossViT-Ti", 73.4), ("small", "CrossViT-S", 81.0), ("base", "CrossViT-B", 82.2),
        ("9", "CrossViT-9", 73.9), ("15", "CrossViT-15", 81.5), ("18", "CrossViT-18", 82.5),
        ("9_dagger", "CrossViT-9-dagger", 77.1), ("15_dagger", "CrossViT-15-dagger", 82.3),
        ("18_dagger", "CrossViT-18-dagger", 82.8))


def _ibm() -> list[Pretrained]:
  out = []
  release = "https://github.com/IBM/CrossViT/releases/download/weights-0.1"
  for short, model, top1 in _IBM:
    out.append(_entry(f"IBM/CrossViT/crossvit_{short}_224", model, f"{release}/crossvit_{short}_224.pth", 240,
                      mean=IMAGENET, crop_pct=0.875, interpolation="bicubic", source="ibm", tag="in1k",
                      timm_name=f"crossvit_{short}_240.in1k", top1=top1, top1_ref="CrossViT paper"))
  for short, model, top1 in (("15_dagger", "CrossViT-15-dagger", 83.5), ("18_dagger", "CrossViT-18-dagger", 83.9)):
    out.append(_entry(f"IBM/CrossViT/crossvit_{short}_384", model, f"{release}/crossvit_{short}_384.pth", 408,
                      mean=IMAGENET, crop_pct=1.0, interpolation="bicubic", source="ibm", tag="in1k_408",
                      timm_name=f"crossvit_{short}_408.in1k", top1=top1, top1_ref="CrossViT paper"))
  return out


# ----------------------------------------------------------------------------- official MaxViT (TF checkpoints)

_MAXVIT = {"MaxViT-T": "tiny", "MaxViT-S": "small", "MaxViT-B": "base", "MaxViT-L": "large", "MaxViT-XL": "xlarge"}
# Official README / paper (Tables 2, 3): ImageNet-1k top-1 of the i1k and i21k->i1k checkpoints.
_MAXVIT_TOP1 = {
    ("MaxViT-T", "i1k", 224): 83.62, ("MaxViT-T", "i1k", 384): 85.24, ("MaxViT-T", "i1k", 512): 85.72,
    ("MaxViT-S", "i1k", 224): 84.45, ("MaxViT-S", "i1k", 384): 85.74, ("MaxViT-S", "i1k", 512): 86.19,
    ("MaxViT-B", "i1k", 224): 84.95, ("MaxViT-B", "i1k", 384): 86.34, ("MaxViT-B", "i1k", 512): 86.66,
    ("MaxViT-L", "i1k", 224): 85.17, ("MaxViT-L", "i1k", 384): 86.40, ("MaxViT-L", "i1k", 512): 86.70,
    ("MaxViT-B", "i21k_i1k", 384): 88.24, ("MaxViT-B", "i21k_i1k", 512): 88.38,
    ("MaxViT-L", "i21k_i1k", 384): 88.32, ("MaxViT-L", "i21k_i1k", 512): 88.46,
    ("MaxViT-XL", "i21k_i1k", 384): 88.51, ("MaxViT-XL", "i21k_i1k", 512): 88.70,
}


def _maxvit_tf() -> list[Pretrained]:
  """gs://gresearch/maxvit/ckpts/maxvit<size>/<i1k|i21k_pt|i21k_i1k>/<res>/ (TF checkpoint directories; the
  EMA weights are used).  Official eval: central crop res/(res+32), bicubic; ImageNet mean/std for the i1k
  224 px models, [-1, 1] for the others."""
  out = []
  for model, size in _MAXVIT.items():
    runs = [("i21k_pt", 224)] if model in ("MaxViT-B", "MaxViT-L", "MaxViT-XL") else []
    runs = ([("i1k", r) for r in (224, 384, 512)] if model != "MaxViT-XL" else []) + runs
    runs += [("i21k_i1k", r) for r in (384, 512)] if model in ("MaxViT-B", "MaxViT-L", "MaxViT-XL") else []
    for run, res in runs:
      path = f"gresearch/maxvit/ckpts/maxvit{size}/{run}/{res}"
      timm_tag = {"i1k": "in1k", "i21k_pt": "in21k", "i21k_i1k": "in21k_ft_in1k"}[run]
      top1 = _MAXVIT_TOP1.get((model, run, res))
      out.append(_entry(path, model, f"gs://{path}/", res, mean=IMAGENET if (run, res) == ("i1k", 224) else INCEPTION,
                        num_classes=21843 if run == "i21k_pt" else 1000,
                        labels="imagenet21k" if run == "i21k_pt" else "imagenet1k", crop_pct=round(res / (res + 32), 4),
                        interpolation="bicubic", source="maxvit_tf", tag=f"{run}_{res}",
                        timm_name=f"maxvit_{size}_tf_{res}.{timm_tag}", top1=top1,
                        top1_ref="MaxViT README / paper" if top1 else None))
  return out


# ----------------------------------------------------------------------------- lookup

_EXTRA: dict[str, Pretrained] = {}


@functools.cache
def _builtin() -> dict[str, Pretrained]:
  # Order matters for `for_model`: the first entry of a model at a size is its default input settings.
  entries = _official() + _timm() + _transformers() + _augreg() + _big_vision() + _ibm() + _maxvit_tf()
  table = {}
  for e in entries:
    if e.name in table:
      raise ValueError(f"catalogue name {e.name!r} appears twice.")
    table[e.name] = e
  return table


def entries() -> dict[str, Pretrained]:
  """name -> entry of every catalogue checkpoint (built-in, then registered)."""
  return {**_builtin(), **_EXTRA}


def register(entry: Pretrained) -> Pretrained:
  """Adds (or replaces) an entry, e.g. a checkpoint on your own bucket; `unregister(name)` removes it."""
  registry.get_model(entry.model, **entry.model_kwargs())  # fails now for an unknown model or bad options
  _EXTRA[entry.name] = entry
  return entry


def unregister(name: str) -> None:
  _EXTRA.pop(name, None)


def list_pretrained(pattern: str | None = None, *, model: str | None = None, source: str | None = None) -> list[str]:
  """Catalogue names, in catalogue order: all, those matching a glob `pattern` (e.g. "timm/vit_base*",
  "*siglip*"), of one of our `model` names, and/or of one `source` (official, timm, transformers,
  augreg, big_vision, ibm, maxvit_tf)."""
  if source is not None and source not in SOURCES:
    raise registry.unknown_name_error("catalogue source", source, list(SOURCES))
  if model is not None:
    registry.get_family(model)  # a clear error for an unknown model name
  return [n for n, e in entries().items()
          if (pattern is None or fnmatch.fnmatchcase(n, pattern)) and (model is None or e.model == model)
          and (source is None or e.source == source)]


def get(name: str) -> Pretrained:
  """The entry of a catalogue name (AugReg names are understood even when not listed)."""
  table = entries()
  if name in table:
    return table[name]
  if name.startswith("vit_models/augreg/"):
    return augreg_entry(name)
  close = close_names(name)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  raise ValueError(f"Unknown pretrained checkpoint {name!r}.{hint} vit_jax.list_pretrained() lists the "
                   f"{len(table)} catalogue names.")


def lookup(name: str) -> Pretrained | None:
  try:
    return get(name)
  except (KeyError, ValueError):
    return None


def close_names(name: str, n: int = 3) -> list[str]:
  import difflib
  return difflib.get_close_matches(name, list(entries()), n=n, cutoff=0.6)


def for_url(uri: str) -> Pretrained | None:
  """The entry one of whose URLs is `uri` (a gs://, https:// or hf-hub: location), if any."""
  bare = uri.rstrip("/")
  repo_only = bare.startswith("hf-hub:") and bare.count("/") == 1  # hf-hub:ORG/REPO: its default files
  for e in entries().values():
    if any(u.rstrip("/") == bare or (repo_only and u.startswith(bare + "/")) for u in e.urls):
      return e
  if bare.startswith("gs://vit_models/augreg/"):
    try:
      return augreg_entry(bare)
    except ValueError:
      return None
  return None


def for_model(model: str) -> tuple[Pretrained, ...]:
  """Every catalogue entry of the model `model` (first: the default input settings at each size)."""
  return tuple(e for e in entries().values() if e.model == model)


def augreg_index(source: str = "gs://vit_models/augreg/index.csv") -> list[dict[str, str]]:
  """The rows of AugReg's index.csv (>50k checkpoints: name, ds, aug, wd, ..., filename, adapt_filename,
  adapt_final_test, ...), downloaded once into the cache.  Load any `filename` / `adapt_filename` with
  `load_pretrained("vit_models/augreg/<filename>")`."""
  import csv
  from vit_jax.weights import hub
  path = hub.fetch(source)
  with open(path, newline="") as f:
    return list(csv.DictReader(f))
