"""Where checkpoints come from: local paths, catalogue names and URIs, through one download cache.

`resolve(source)` turns what a user passes to `load_pretrained` into a local file (or directory):

  a local path                 used as it is (`FILE.npz:img` selects big_vision's image tower)
  a catalogue name             `vit_jax.list_pretrained()`; its URLs are tried in order
  gs://BUCKET/OBJECT           through the bucket's public HTTPS endpoint (no credentials); a trailing
                               '/' is a directory (TF checkpoints), listed with the JSON API
  https://... / http://...     as it is
  hf-hub:ORG/REPO[@REV][/FILE] `{HF_ENDPOINT}/ORG/REPO/resolve/REV/FILE` (FILE: model.safetensors, else
                               pytorch_model.bin); $HF_TOKEN is sent for gated repositories

Downloads land in the cache, `$VIT_JAX_CACHE` (default `~/.cache/vit_jax`), under a path that
does not depend on the endpoint:

  gs://B/O       -> CACHE/gcs/B/O
  hf-hub:O/R/F   -> CACHE/hf/O/R/REV/F        (REV: main unless given)
  https://H/P    -> CACHE/https/H/P

A file is written to `PATH.part` and renamed to PATH only when complete and checked: its size, the
checksum the server publishes (GCS `x-goog-hash` md5, the hub's `X-Linked-Etag` sha256) and a sha256
pinned in the catalogue.  An interrupted download resumes from the `.part` file (HTTP Range); a file
in the cache is never downloaded again; a process lock keeps concurrent processes from downloading
the same file twice.  A download that fails raises `DownloadError` with the URL, the reason and the
exact path where the file can be placed by hand.  Endpoints: `$VIT_JAX_GCS_ENDPOINT` (default
https://storage.googleapis.com) and `$HF_ENDPOINT` (default https://huggingface.co).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import pathlib
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Sequence

from vit_jax.weights import catalog

CHUNK = 1 << 20
DEFAULT_GCS_ENDPOINT = "https://storage.googleapis.com"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")
SCHEMES = ("gs://", "https://", "http://", "hf-hub:")
_NOT_FOUND = (401, 403, 404, 410)  # no retry: another URL may have it
_SUBTREE = re.compile(r"^(.+\.npz):([A-Za-z0-9_/]+)$")


class DownloadError(OSError):
  """A checkpoint could not be downloaded (the message names the URL(s), the reason and the manual path)."""


class _NotThere(Exception):
  """The server says this URL does not exist (try the next one)."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("VIT_JAX_CACHE") or pathlib.Path.home() / ".cache" / "vit_jax").expanduser()


def gcs_endpoint() -> str:
  return (os.environ.get("VIT_JAX_GCS_ENDPOINT") or DEFAULT_GCS_ENDPOINT).rstrip("/")


def hf_endpoint() -> str:
  return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def is_uri(source: str) -> bool:
  return source.startswith(SCHEMES)


# ----------------------------------------------------------------------------- locations

@dataclasses.dataclass(frozen=True)
class Location:
  uri: str                # what the user (or the catalogue) wrote
  url: str                # what is fetched
  path: pathlib.Path      # where it lives in the cache
  directory: bool = False
  listing: str | None = None   # JSON listing URL of a gs:// directory


def locate(uri: str) -> list[Location]:
  """The candidate locations of a URI (several for an hf-hub repository without a file name)."""
  cache = cache_dir()
  if uri.startswith("gs://"):
    bucket, _, obj = uri[len("gs://"):].partition("/")
    if not bucket or not obj:
      raise ValueError(f"{uri!r}: a gs:// URI needs a bucket and an object, gs://BUCKET/PATH.")
    url = f"{gcs_endpoint()}/{bucket}/{urllib.parse.quote(obj, safe='/+-_.~')}"
    if obj.endswith("/"):
      listing = (f"{gcs_endpoint()}/storage/v1/b/{bucket}/o?prefix={urllib.parse.quote(obj, safe='')}"
                 "&fields=items(name,size,md5Hash),nextPageToken")
      return [Location(uri, url, cache / "gcs" / bucket / obj.rstrip("/"), directory=True, listing=listing)]
    return [Location(uri, url, cache / "gcs" / bucket / obj)]
  if uri.startswith("hf-hub:"):
    parts = uri[len("hf-hub:"):].strip("/").split("/")
    if len(parts) < 2:
      raise ValueError(f"{uri!r}: expected hf-hub:ORG/REPO[@REVISION][/FILE].")
    org, repo, file = parts[0], parts[1], "/".join(parts[2:])
    repo, _, revision = repo.partition("@")
    revision = revision or "main"
    files = (file,) if file else HF_DEFAULT_FILES
    return [Location(uri, f"{hf_endpoint()}/{org}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{f}",
                     cache / "hf" / org / repo / revision / f) for f in files]
  if uri.startswith(("https://", "http://")):
    parsed = urllib.parse.urlsplit(uri)
    path = urllib.parse.unquote(parsed.path).lstrip("/") or "index"
    return [Location(uri, uri, cache / "https" / parsed.netloc.replace(":", "_") / path)]
  raise ValueError(f"{uri!r} is not a URI ({', '.join(SCHEMES)}).")


# ----------------------------------------------------------------------------- downloading

@contextlib.contextmanager
def _lock(path: pathlib.Path):
  """An exclusive lock on `path` between processes of this machine (no-op where fcntl is missing)."""
  locks = cache_dir() / ".locks"
  locks.mkdir(parents=True, exist_ok=True)
  name = hashlib.sha1(str(path).encode()).hexdigest()
  try:
    import fcntl
  except ImportError:  # pragma: no cover (Windows)
    yield
    return
  with open(locks / name, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _KeepHeaders(urllib.request.HTTPRedirectHandler):
  """Follows redirects, remembering the checksum headers of the responses on the way (the hub sends the
  sha256 of a large file on its 302 to the CDN) and dropping credentials when the host changes."""

  def __init__(self):
    self.seen: dict[str, str] = {}

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    for name in ("x-linked-etag", "x-linked-size", "x-goog-hash"):
      if headers.get(name):
        self.seen[name] = ",".join(headers.get_all(name))
    new = super().redirect_request(req, fp, code, msg, headers, newurl)
    if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
      new.remove_header("Authorization")
    return new


def _headers_for(url: str) -> dict[str, str]:
  headers = {"User-Agent": "vit_jax"}
  token = os.environ.get("HF_TOKEN")
  if token and url.startswith(hf_endpoint() + "/"):
    headers["Authorization"] = f"Bearer {token}"
  return headers


def _expected_checksums(headers: Mapping[str, str]) -> dict[str, str]:
  """{'md5': hex, 'sha256': hex} that the server publishes for the whole file."""
  out = {}
  for value in headers.get("x-goog-hash", "").split(","):
    algo, _, digest = value.strip().partition("=")
    if algo == "md5" and digest:
      try:
        out["md5"] = base64.b64decode(digest).hex()
      except ValueError:
        out["md5"] = "(undecodable)" + digest
  etag = headers.get("x-linked-etag", "").strip().removeprefix("W/").strip('"')
  if re.fullmatch(r"[0-9a-f]{64}", etag):
    out["sha256"] = etag
  return out


def _file_digests(path: pathlib.Path, algos) -> dict[str, str]:
  hashes = {a: hashlib.new(a) for a in algos}
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK), b""):
      for h in hashes.values():
        h.update(chunk)
  return {a: h.hexdigest() for a, h in hashes.items()}


def _timeout() -> float:
  return float(os.environ.get("VIT_JAX_DOWNLOAD_TIMEOUT", 60))


def _download(url: str, dest: pathlib.Path, *, sha256: str | None, attempts: int) -> None:
  """`url` -> `dest` via `dest.part` (resumed), checked, then renamed.  Raises _NotThere or DownloadError."""
  part = dest.with_name(dest.name + ".part")
  dest.parent.mkdir(parents=True, exist_ok=True)
  checksums: dict[str, str] = {}
  total = None
  reason = None
  for attempt in range(max(1, attempts)):
    if attempt:
      time.sleep(min(0.2 * 2 ** attempt, 5.0))
    offset = part.stat().st_size if part.exists() else 0
    keep = _KeepHeaders()
    opener = urllib.request.build_opener(keep)
    request = urllib.request.Request(url, headers=_headers_for(url))
    if offset:
      request.add_header("Range", f"bytes={offset}-")
    try:
      response = opener.open(request, timeout=_timeout())
    except urllib.error.HTTPError as e:
      if e.code == 416 and offset:  # nothing left to fetch: the .part file may be complete (checked below)
        total = offset if total is None else total
        break
      if e.code in _NOT_FOUND:
        raise _NotThere(f"HTTP {e.code} {e.reason}") from None
      reason = f"HTTP {e.code} {e.reason}"
      continue
    except urllib.error.URLError as e:
      # DNS failure / connection refused: offline, retrying will not help.
      if isinstance(e.reason, (ConnectionRefusedError, socket.gaierror)):
        raise DownloadError(f"{type(e.reason).__name__}: {e.reason}") from None
      reason = f"{e.reason}"
      continue
    except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
      reason = f"{type(e).__name__}: {e}"
      continue
    with response:
      headers = {k.lower(): v for k, v in response.headers.items()}
      headers.update({k: v for k, v in keep.seen.items() if k not in headers})
      checksums.update(_expected_checksums(headers))
      length = headers.get("content-length")
      if response.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("content-range", ""))
        if not m or int(m.group(1)) != offset:  # not the range we asked for: start again
          part.unlink(missing_ok=True)
          reason = "the server answered another byte range"
          continue
        total = int(m.group(2)) if m.group(2) != "*" else None
        mode = "ab"
      else:  # 200: the whole file (a server that ignores Range restarts it)
        offset, mode = 0, "wb"
        total = int(length) if length is not None else None
      if attempt == 0 or offset == 0:
        size = f"{total / 2**20:.1f} MiB" if total else "unknown size"
        logging.info("vit_jax: downloading %s (%s%s) to %s", url, size,
                     f", resuming at {offset} bytes" if offset else "", dest)
      try:
        with open(part, mode) as f:
          for chunk in iter(lambda: response.read(CHUNK), b""):
            f.write(chunk)
      except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
        reason = f"connection lost after {part.stat().st_size if part.exists() else 0} bytes ({type(e).__name__})"
        continue
    have = part.stat().st_size
    if total is not None and have < total:
      reason = f"connection lost after {have} of {total} bytes"
      continue
    break
  else:
    raise DownloadError(f"{reason} (after {max(1, attempts)} attempts; the partial file {part} is kept and the "
                        "next call resumes it)")

  have = part.stat().st_size if part.exists() else 0
  problems = []
  if total is not None and have != total:
    problems.append(f"size {have} bytes, expected {total}")
  wanted = dict(checksums)
  if sha256:
    wanted["sha256"] = sha256.lower()
  if wanted and not problems:
    got = _file_digests(part, sorted(wanted))
    problems += [f"{a} {got[a]}, expected {wanted[a]}" for a in sorted(wanted) if got[a] != wanted[a]]
  if problems:
    part.unlink(missing_ok=True)
    raise DownloadError(f"the downloaded file is corrupt ({'; '.join(problems)}); it was deleted, call again "
                        "to download it anew")
  os.replace(part, dest)


def _list_gcs(location: Location) -> list[dict[str, Any]]:
  """Objects under a gs:// directory (JSON API, public buckets), following pages (at most 100)."""
  items, token = [], None
  for _ in range(100):
    url = location.listing + (f"&pageToken={urllib.parse.quote(token)}" if token else "")
    try:
      with urllib.request.urlopen(urllib.request.Request(url, headers=_headers_for(url)),
                                  timeout=_timeout()) as response:
        page = json.load(response)
    except urllib.error.HTTPError as e:
      if e.code in _NOT_FOUND:
        raise _NotThere(f"HTTP {e.code} {e.reason} (listing)") from None
      raise DownloadError(f"listing {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
      raise DownloadError(f"listing {url}: {getattr(e, 'reason', e)}") from None
    items += page.get("items", [])
    token = page.get("nextPageToken")
    if not token:
      return items
  raise DownloadError(f"listing {location.listing}: more than 100 pages")


def _complete_dir(path: pathlib.Path) -> bool:
  """A TF checkpoint directory is complete once its `.index` is there (written last)."""
  return path.is_dir() and any(p.suffix == ".index" for p in path.iterdir())


def _fetch_dir(location: Location, attempts: int) -> pathlib.Path:
  prefix = location.uri[len("gs://"):].partition("/")[2]
  bucket = location.uri[len("gs://"):].partition("/")[0]
  items = _list_gcs(location)
  if not items:
    raise _NotThere("no objects under this prefix")
  names = {item["name"][len(prefix):]: item for item in items if not item["name"].endswith("/")}
  if "checkpoint" in names:  # a TF checkpoint directory: only the files of its latest checkpoint
    dest = location.path / "checkpoint"
    _download(f"{location.url}checkpoint", dest, sha256=None, attempts=attempts)
    m = re.search(r'model_checkpoint_path:\s*"([^"]+)"', dest.read_text())
    if m:
      latest = os.path.basename(m.group(1))
      names = {n: i for n, i in names.items() if n == "checkpoint" or n.startswith(latest + ".")}
  # Data shards first, the .index last: a directory with an .index is complete.
  for name in sorted(names, key=lambda n: (n.endswith(".index"), n)):
    dest = location.path / name
    if dest.exists():
      continue
    md5 = names[name].get("md5Hash")
    url = f"{gcs_endpoint()}/{bucket}/{urllib.parse.quote(prefix + name, safe='/+-_.~')}"
    try:
      _download(url, dest, sha256=None, attempts=attempts)
    except _NotThere as e:
      raise DownloadError(f"{url}: {e}") from None
    if md5 and _file_digests(dest, ["md5"])["md5"] != base64.b64decode(md5).hex():
      dest.unlink()
      raise DownloadError(f"{url}: md5 differs from the bucket listing's; the file was deleted, call again")
  return location.path


def fetch(uri: str | Sequence[str], *, sha256: str | None = None, attempts: int | None = None,
          what: str | None = None) -> pathlib.Path:
  """The local path of `uri` (one URI, or several alternatives tried in order), downloading it into the
  cache when it is not there yet.  Raises DownloadError naming every URL tried, why, and where to put
  the file by hand."""
  uris = [uri] if isinstance(uri, str) else list(uri)
  attempts = int(os.environ.get("VIT_JAX_DOWNLOAD_ATTEMPTS", 3)) if attempts is None else attempts
  locations = [loc for u in uris for loc in locate(u)]
  for loc in locations:  # anything already in the cache (or placed there by hand) wins
    if (_complete_dir(loc.path) if loc.directory else loc.path.is_file()):
      return loc.path
  tried = []
  for loc in locations:
    with _lock(loc.path):
      if (_complete_dir(loc.path) if loc.directory else loc.path.is_file()):  # another process finished it
        return loc.path
      try:
        if loc.directory:
          return _fetch_dir(loc, attempts)
        _download(loc.url, loc.path, sha256=sha256, attempts=attempts)
        return loc.path
      except _NotThere as e:
        tried.append(f"  {loc.url}: not there ({e})")
      except DownloadError as e:
        tried.append(f"  {loc.url}: {e}")
        if "corrupt" in str(e) or "Refused" in str(e) or "gaierror" in str(e):
          break  # offline or a bad file: the other candidates will not do better
  first = locations[0]
  place = (f"place the checkpoint's files in the directory {first.path}/" if first.directory else
           f"place the file at {first.path}")
  raise DownloadError(
      f"Could not download {what or uris[0]}:\n" + "\n".join(tried) +
      f"\nIf this machine is offline or the download keeps failing, fetch {first.uri} another way and "
      f"{place} (cache: $VIT_JAX_CACHE, now {cache_dir()}); the next call uses it.")


# ----------------------------------------------------------------------------- resolving a source

@dataclasses.dataclass(frozen=True)
class Resolved:
  path: pathlib.Path | None           # local file or directory (None for an in-memory mapping)
  entry: "catalog.Pretrained | None"  # the catalogue entry, when the source is one (or one of its URLs)
  subtree: str | None = None          # part of a multi-model checkpoint to read ('img')
  mapping: Mapping | None = None


def split_subtree(source: str) -> tuple[str, str | None]:
  """'x.npz:img' -> ('x.npz', 'img') (big_vision's notation); anything else -> (source, None)."""
  m = _SUBTREE.match(source)
  return (m.group(1), m.group(2)) if m else (source, None)


def _local_exists(path: str) -> bool:
  return os.path.exists(path) or os.path.exists(path + ".index")


def resolve(source) -> Resolved:
  """A local path, a catalogue name, a gs:// / https:// / hf-hub: URI (optionally `...npz:SUBTREE`) or
  an in-memory mapping -> what to read (downloading into the cache when needed)."""
  if isinstance(source, Mapping):
    return Resolved(None, None, mapping=source)
  text = os.fspath(source)
  if _local_exists(text):
    return Resolved(pathlib.Path(text), None)
  base, subtree = split_subtree(text)
  if subtree and _local_exists(base):
    return Resolved(pathlib.Path(base), None, subtree)
  entry = catalog.lookup(text)
  if entry is not None:
    return Resolved(fetch(entry.urls, sha256=entry.sha256, what=f"{entry.name!r} ({', '.join(entry.urls)})"),
                    entry, entry.subtree)
  if is_uri(text):
    entry = catalog.for_url(base)
    if entry is not None and subtree is None:
      subtree = entry.subtree
    return Resolved(fetch(base, sha256=entry.sha256 if entry else None), entry, subtree)
  raise FileNotFoundError(_not_found_message(text))


def _not_found_message(text: str) -> str:
  close = catalog.close_names(text)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  return (f"checkpoint {text!r} does not exist: it is no local file, no catalogue name{hint} "
          f"(vit_jax.list_pretrained() lists them) and no URI ({', '.join(SCHEMES)}...).")


def check_source(source: str) -> None:
  """Cheap check (no download) that `source` can name a checkpoint: an existing path, a catalogue name or a
  URI.  Raises FileNotFoundError naming the three forms."""
  text = os.fspath(source)
  base, subtree = split_subtree(text)
  if _local_exists(text) or (subtree and _local_exists(base)) or catalog.lookup(text) or is_uri(text):
    return
  raise FileNotFoundError(_not_found_message(text))
