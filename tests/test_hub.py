"""Weights by name: the catalogue, the download cache and its errors, against a local HTTP server.

The server (127.0.0.1, a port the OS picks, stopped by the fixture) lays files out as the real
endpoints: `/{bucket}/{object}` with GCS's `x-goog-hash` md5 header and the JSON listing
`/storage/v1/b/{bucket}/o?prefix=`, and the hub's `/{org}/{repo}/resolve/{rev}/{file}`, answered with
a 302 to a CDN path that carries the file's sha256 (`X-Linked-Etag`), as huggingface.co does.
`$VIT_JAX_GCS_ENDPOINT` / `$HF_ENDPOINT` point the code at it; `$VIT_JAX_CACHE` at a temporary cache.
"""
import base64
import hashlib
import http.server
import json
import pathlib
import re
import shutil
import socket
import threading
import urllib.parse

import jax
import numpy as np
import pytest

import vit_jax
from vit_jax.models import registry
from vit_jax.weights import catalog, hub

FIX = pathlib.Path(__file__).parent / "fixtures"
OPTS = {k: v for k, v in json.loads((FIX / "vit" / "cases.json").read_text())["plain_token"].items()}
TINY_NPZ = (FIX / "vit" / "plain_token.official.npz").read_bytes()


class FakeServer:
  """Serves `files` (path -> bytes); `cut[path] = n` closes the connection after n bytes (once);
  `headers[path]` overrides response headers; every request is logged as (path, Range header)."""

  def __init__(self):
    self.files, self.cut, self.headers, self.log = {}, {}, {}, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_GET(self):
        parsed = urllib.parse.urlsplit(self.path)
        server.log.append((parsed.path, self.headers.get("Range")))
        listing = re.fullmatch(r"/storage/v1/b/([^/]+)/o", parsed.path)
        if listing:
          prefix = urllib.parse.parse_qs(parsed.query)["prefix"][0]
          bucket = listing.group(1)
          items = [{"name": p[len(bucket) + 2:], "size": str(len(d)), "md5Hash": base64.b64encode(
                    hashlib.md5(d).digest()).decode()} for p, d in server.files.items()
                   if p.startswith(f"/{bucket}/{prefix}")]
          return self._send(200, json.dumps({"items": items}).encode(), {"Content-Type": "application/json"})
        hub_file = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", parsed.path)
        if hub_file and parsed.path in server.files:  # LFS file: redirect to the CDN with its sha256
          sha = hashlib.sha256(server.files[parsed.path]).hexdigest()
          server.files.setdefault(f"/cdn/{sha}", server.files[parsed.path])
          return self._send(302, b"", {"Location": f"/cdn/{sha}", "X-Linked-Etag": f'"{sha}"',
                                       "X-Linked-Size": str(len(server.files[parsed.path]))})
        data = server.files.get(parsed.path)
        if data is None:
          return self._send(404, b"not found")
        headers = {"x-goog-hash": "crc32c=AAAAAA==,md5=" + base64.b64encode(hashlib.md5(data).digest()).decode()}
        headers.update(server.headers.get(parsed.path, {}))
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m:
          start = int(m.group(1))
          headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        cut = server.cut.pop(parsed.path, None)
        self._send(206 if m else 200, body, headers, cut=cut)

      def _send(self, code, body, headers=(), cut=None):
        self.send_response(code)
        for k, v in dict(headers).items():
          self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: no races
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    self.thread.start()

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join(timeout=5)

  def gets(self, path):
    return [r for p, r in self.log if p == path]


@pytest.fixture
def server(tmp_path, monkeypatch):
  fake = FakeServer()
  monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("VIT_JAX_GCS_ENDPOINT", fake.url)
  monkeypatch.setenv("HF_ENDPOINT", fake.url)
  monkeypatch.setenv("VIT_JAX_DOWNLOAD_TIMEOUT", "10")
  monkeypatch.delenv("HF_TOKEN", raising=False)
  yield fake
  fake.stop()


@pytest.fixture
def tiny_entry():
  """A catalogue entry of the tiny official-layout fixture, on a fake bucket path."""
  entry = catalog.register(catalog.Pretrained(
      name="vit_models/test/plain_token", model="ViT-B_16", urls=("gs://vit_models/test/plain_token.npz",),
      image_size=32, num_classes=5, labels="test", options=tuple(sorted((k, v) for k, v in OPTS.items()
                                                                         if k not in ("image_size", "num_classes")))))
  yield entry
  catalog.unregister(entry.name)


def timm_logits():
  io = np.load(FIX / "vit" / "plain_token.io.npz")
  return io["images"], io["logits"]


def apply(model, variables, images):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply(variables, images))


# ----------------------------------------------------------------------------- the cache

def test_a_catalogue_name_downloads_once_into_the_cache(server, tiny_entry, tmp_path):
  server.files["/vit_models/test/plain_token.npz"] = TINY_NPZ
  model, variables = vit_jax.load_model("vit_models/test/plain_token")  # the entry names the model
  images, want = timm_logits()
  assert np.abs(apply(model, variables, images) - want).max() < 1e-5
  cached = tmp_path / "cache" / "gcs" / "vit_models" / "test" / "plain_token.npz"
  assert cached.read_bytes() == TINY_NPZ and not list((tmp_path / "cache").rglob("*.part"))
  # Again by name, by gs:// URI and by https:// URL of the same object: no second download.
  vit_jax.load_pretrained("vit_models/test/plain_token")
  vit_jax.load_pretrained("gs://vit_models/test/plain_token.npz")  # an entry's URL also names the model
  assert server.gets("/vit_models/test/plain_token.npz") == [None]
  assert [e.name for e in registry.pretrained_cfgs("ViT-B_16")][-1] == "vit_models/test/plain_token"


def test_hf_hub_files_come_through_the_resolve_url_with_their_sha256(server, tmp_path):
  data = (FIX / "hf_vit" / "classifier" / "model.safetensors").read_bytes()
  server.files["/google/vit-test/resolve/v1/model.safetensors"] = data
  opts = dict(image_size=32, patch_size=8, hidden_size=32, depth=2, mlp_dim=64, num_heads=2, approximate_gelu=False)
  model = vit_jax.get_model("ViT-B_16", num_classes=5, **opts)
  variables = vit_jax.load_pretrained("hf-hub:google/vit-test@v1", model=model)  # default file: model.safetensors
  io = np.load(FIX / "hf_vit" / "classifier.io.npz")
  assert np.abs(apply(model, variables, io["images"]) - io["outputs"]).max() < 1e-5
  assert (tmp_path / "cache" / "hf" / "google" / "vit-test" / "v1" / "model.safetensors").read_bytes() == data
  assert server.gets(f"/cdn/{hashlib.sha256(data).hexdigest()}") == [None]  # followed the redirect once
  # The sha256 of the redirect is checked: a CDN serving other bytes is rejected.
  server.files["/google/vit-bad/resolve/main/model.safetensors"] = data
  server.files[f"/cdn/{hashlib.sha256(data).hexdigest()}"] = data[:-1] + b"\0"
  with pytest.raises(hub.DownloadError, match="sha256"):
    hub.fetch("hf-hub:google/vit-bad/model.safetensors")


def test_a_cut_off_download_resumes_where_it_stopped(server, tmp_path):
  data = np.random.default_rng(0).bytes(3 * 2**20 + 17)
  server.files["/bucket/big.bin"] = data
  server.cut["/bucket/big.bin"] = 2**20 + 5  # the first response stops there
  path = hub.fetch("gs://bucket/big.bin")
  assert path.read_bytes() == data
  assert server.gets("/bucket/big.bin") == [None, f"bytes={2**20 + 5}-"]  # the rest only, not the whole file
  # Across calls: one attempt per call leaves the partial file, the next call resumes it.
  server.files["/bucket/big2.bin"] = data
  server.cut["/bucket/big2.bin"] = 123_456
  with pytest.raises(hub.DownloadError, match="partial file .* is kept and the next call resumes it"):
    hub.fetch("gs://bucket/big2.bin", attempts=1)
  part = tmp_path / "cache" / "gcs" / "bucket" / "big2.bin.part"
  assert part.stat().st_size == 123_456
  assert hub.fetch("gs://bucket/big2.bin", attempts=1).read_bytes() == data
  assert server.gets("/bucket/big2.bin") == [None, "bytes=123456-"] and not part.exists()


def test_a_wrong_checksum_is_rejected_and_the_cache_stays_clean(server, tiny_entry, tmp_path):
  server.files["/vit_models/test/plain_token.npz"] = TINY_NPZ
  server.headers["/vit_models/test/plain_token.npz"] = {
      "x-goog-hash": "md5=" + base64.b64encode(hashlib.md5(b"other bytes").digest()).decode()}
  with pytest.raises(hub.DownloadError, match="corrupt .*md5 .*expected .*deleted"):
    vit_jax.load_pretrained("vit_models/test/plain_token")
  assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and ".locks" not in p.parts] == []
  # A sha256 pinned in the catalogue is checked too (here the server's md5 is right).
  del server.headers["/vit_models/test/plain_token.npz"]
  catalog.register(catalog.Pretrained(**{**tiny_entry.__dict__, "sha256": "0" * 64}))
  with pytest.raises(hub.DownloadError, match="sha256 .*, expected 0000"):
    vit_jax.load_pretrained("vit_models/test/plain_token")
  assert not (tmp_path / "cache" / "gcs" / "vit_models" / "test" / "plain_token.npz").exists()
  catalog.register(catalog.Pretrained(**{**tiny_entry.__dict__, "sha256": hashlib.sha256(TINY_NPZ).hexdigest()}))
  vit_jax.load_pretrained("vit_models/test/plain_token")


def test_offline_names_the_url_the_reason_and_where_to_put_the_file(tiny_entry, tmp_path, monkeypatch):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv("VIT_JAX_GCS_ENDPOINT", f"http://127.0.0.1:{port}")
  monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(hub.DownloadError) as error:
    vit_jax.load_pretrained("vit_models/test/plain_token")
  message = str(error.value)
  target = tmp_path / "cache" / "gcs" / "vit_models" / "test" / "plain_token.npz"
  assert f"http://127.0.0.1:{port}/vit_models/test/plain_token.npz" in message
  assert "Connection refused" in message and f"place the file at {target}" in message
  target.parent.mkdir(parents=True, exist_ok=True)
  shutil.copy(FIX / "vit" / "plain_token.official.npz", target)  # by hand, as the message says
  variables = vit_jax.load_pretrained("vit_models/test/plain_token")
  images, want = timm_logits()
  model = vit_jax.get_model("ViT-B_16", **OPTS)
  assert np.abs(apply(model, variables, images) - want).max() < 1e-5


def test_the_next_url_is_tried_when_one_is_missing(server, tmp_path):
  server.files["/vit_models/test/second.npz"] = TINY_NPZ
  path = hub.fetch(["gs://vit_models/test/first.npz", "gs://vit_models/test/second.npz"])
  assert path.read_bytes() == TINY_NPZ and server.gets("/vit_models/test/first.npz") == [None]
  with pytest.raises(hub.DownloadError, match=r"(?s)nothing.npz: not there \(HTTP 404.*place the file at"):
    hub.fetch("gs://vit_models/test/nothing.npz")


def test_a_tf_checkpoint_directory_comes_from_the_bucket_listing(server, tmp_path):
  tf = pytest.importorskip("tensorflow")
  value = np.arange(6, dtype=np.float32).reshape(2, 3)
  prefix = tf.train.Checkpoint(w=tf.Variable(value)).write(str(tmp_path / "tf" / "model.ckpt-5"))
  for f in pathlib.Path(prefix).parent.iterdir():
    server.files[f"/gresearch/maxvit/test/224/{f.name}"] = f.read_bytes()
  server.files["/gresearch/maxvit/test/224/checkpoint"] = b'model_checkpoint_path: "model.ckpt-5"\n'
  server.files["/gresearch/maxvit/test/224/model.ckpt-1.index"] = b"an older checkpoint"
  flat = vit_jax.weights.core.read_source("gs://gresearch/maxvit/test/224/")
  np.testing.assert_array_equal(flat["w/.ATTRIBUTES/VARIABLE_VALUE"], value)
  got = sorted(p.name for p in (tmp_path / "cache" / "gcs" / "gresearch" / "maxvit" / "test" / "224").iterdir())
  assert got == ["checkpoint", "model.ckpt-5.data-00000-of-00001", "model.ckpt-5.index"]  # not ckpt-1


def test_augreg_index_and_any_augreg_name(server):
  name = "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0"
  adapted = f"{name}--oxford_iiit_pet-steps_2k-lr_0.003-res_384"
  server.files["/vit_models/augreg/index.csv"] = (
      "name,ds,aug,filename,adapt_ds,adapt_resolution,adapt_final_test,adapt_filename\n"
      f"R26_S_32,i21k,light1,{name},oxford_iiit_pet,384,0.93,{adapted}\n").encode()
  rows = catalog.augreg_index()
  assert rows[0]["adapt_filename"] == adapted and rows[0]["adapt_final_test"] == "0.93"
  entry = vit_jax.pretrained_info(f"vit_models/augreg/{rows[0]['adapt_filename']}")  # not listed, parsed
  assert (entry.model, entry.image_size, entry.num_classes, entry.labels) == ("R26+ViT-S_32", 384, 37,
                                                                              "oxford_iiit_pet")
  assert entry.urls == (f"gs://vit_models/augreg/{adapted}.npz",)
  upstream = vit_jax.pretrained_info(f"vit_models/augreg/{name}")
  assert (upstream.image_size, upstream.num_classes, upstream.top1) == (224, 21843, None)
  recommended = vit_jax.pretrained_info(f"vit_models/augreg/{name}--imagenet2012-steps_20k-lr_0.01-res_384")
  assert recommended.top1 == 83.85  # the README's table


def test_predict_and_training_take_catalogue_names(server, tmp_path, load_config, initial_variables, capsys):
  from PIL import Image
  from vit_jax import predict
  from vit_jax.train import trainer
  from vit_jax.weights.core import flatten
  config = load_config()  # configs/testing.py: a tiny ViT-Ti_16 variant at 8 px, 10 classes
  variables = initial_variables(config)
  buffer = tmp_path / "run.npz"
  np.savez(buffer, **{k: np.asarray(v) for k, v in flatten(variables["params"]).items()})
  server.files["/vit_models/test/run.npz"] = buffer.read_bytes()
  options = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  entry = catalog.register(catalog.Pretrained(
      name="vit_models/test/run", model="ViT-Ti_16", urls=("gs://vit_models/test/run.npz",), image_size=8,
      num_classes=10, options=tuple(sorted(options.items()))))
  try:
    config.pretrained = entry.name  # python -m vit_jax.main --config.pretrained=NAME
    config.mesh.data = 1
    state = trainer.initial_state(config, trainer.validate(config, num_devices=1))
    np.testing.assert_array_equal(np.asarray(state.params["embedding"]["kernel"]),
                                  variables["params"]["embedding"]["kernel"])
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "x.png")
    assert predict.main(["--weights", entry.name, str(tmp_path / "x.png")]) == 0  # no --model: the entry's
    assert len(capsys.readouterr().out.strip().splitlines()) == 6  # the file and its top-5
    assert server.gets("/vit_models/test/run.npz") == [None]
  finally:
    catalog.unregister(entry.name)


def test_sources_that_are_nothing_say_so():
  with pytest.raises(FileNotFoundError, match="does not exist: it is no local file, no catalogue name"):
    vit_jax.load_pretrained("/no/such/file.npz", model="ViT-B_16")
  with pytest.raises(FileNotFoundError, match="Did you mean 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'"):
    vit_jax.load_pretrained("timm/vit_base_patch16_224.augreg2_in21k_ft_in1", model="ViT-B_16")
  with pytest.raises(TypeError, match="pass model="):
    vit_jax.load_pretrained(FIX / "vit" / "plain_token.official.npz")
  with pytest.raises(ValueError, match="Unknown pretrained checkpoint"):
    vit_jax.pretrained_info("ViT-B_16")


# ----------------------------------------------------------------------------- the catalogue

def _size_in_name(entry):
  """The input size the entry's own name states, if it states one."""
  name = entry.name
  if entry.source == "timm":
    return int(re.search(r"_(\d+)\.", name).group(1))
  if entry.source == "augreg":
    m = re.search(r"res_(\d+)$", name)
    return int(m.group(1)) if m else 224
  if entry.source in ("maxvit_tf",):
    return int(name.rsplit("/", 1)[1])
  if entry.source == "transformers":
    return int(re.search(r"-(224|384)", name).group(1))
  if entry.source == "ibm":  # IBM names the large branch's size: 224 -> 240 px input, 384 -> 408
    return {"224": 240, "384": 408}[name[-3:]]
  if entry.source == "official":
    return 384 if "imagenet2012/" in name and not name.endswith("-224") else 224
  m = re.search(r"_(224|256|384|512)(_|:|$)", name)
  return int(m.group(1)) if m else None


def _classes_in_name(entry):
  """The class counts the entry's own name allows (None: it says nothing); 0 = a checkpoint without head."""
  name = entry.name
  if entry.source == "timm":
    tag = name.split(".", 1)[1]
    return {1000} if tag.endswith("in1k") else {21843, 0} if tag.endswith("in21k") else None
  if entry.source in ("augreg", "official") and ("imagenet2012" in name or "/sam/" in name):
    return {1000}
  if entry.source == "maxvit_tf":
    return {21843} if "/i21k_pt/" in name else {1000}
  if entry.source == "transformers":
    return {0} if name.endswith("-in21k") else {1000}
  return None


def test_every_catalogue_entry_is_a_consistent_model():
  entries = catalog.entries()
  counts = {s: len(catalog.list_pretrained(source=s)) for s in catalog.SOURCES}
  assert counts == {"official": 22, "timm": 88, "transformers": 11, "augreg": 47, "big_vision": 25, "ibm": 11,
                    "maxvit_tf": 21}, counts
  assert len(entries) == sum(counts.values()) == len(vit_jax.list_pretrained())
  models = set(vit_jax.list_models())
  for name, e in entries.items():
    assert e.model in models, name
    model = vit_jax.get_model(e.model, **e.model_kwargs())  # options, class count and image size fit the model
    assert model.image_size == e.image_size and model.num_classes == e.num_classes
    assert catalog.LABELS[e.labels] == e.num_classes, name
    assert _size_in_name(e) in (None, e.image_size), name
    assert _classes_in_name(e) is None or e.num_classes in _classes_in_name(e), name
    assert e.normalization in ("minus_one_one", "imagenet") and 0 < e.crop_pct <= 1, name
    assert e.urls and all(hub.locate(u) for u in e.urls), name
    assert (e.top1 is None) == (e.top1_ref is None) and (e.top1 is None or 70 < e.top1 < 90), name
    assert e.timm_name is None or f"timm/{e.timm_name}" in entries, name  # the same weights' timm port
    if e.subtree:
      assert e.urls[0].endswith(".npz") and name.endswith(f":{e.subtree}")
  assert vit_jax.list_pretrained("timm/maxvit_tiny*") == [f"timm/maxvit_tiny_tf_{s}.in1k" for s in (224, 384, 512)]
  assert vit_jax.list_pretrained(model="CrossViT-15-dagger", source="ibm") == [
      "IBM/CrossViT/crossvit_15_dagger_224", "IBM/CrossViT/crossvit_15_dagger_384"]
