"""Storage locations as URIs (a local path, file://, s3://, gs://) through pyarrow's filesystems, read and written
the same way on every node: one storage root per pipeline, and every stage output a URI under it."""

from __future__ import annotations

import functools
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

LOCAL_SCHEMES = ("", "file")
CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile or instance role) on every node; "
          "for an S3-compatible store give its endpoint as s3://bucket/prefix?endpoint_override=http://HOST:PORT "
          "or in AWS_ENDPOINT_URL",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS (or use the node's service account) on every node",
}


class StorageError(OSError):
    """A storage URI that cannot be used, or an object in it that is missing or unreadable; the message names
    the URI and what to set."""


def is_local(uri: str | Path) -> bool:
    """True for a plain path or a file:// URI."""
    return urlsplit(str(uri)).scheme in LOCAL_SCHEMES or _is_windows_drive(str(uri))


def _is_windows_drive(uri: str) -> bool:
    return len(uri) > 1 and uri[1] == ":"


def normalize(uri: str | Path) -> str:
    """The canonical form of a location: an absolute path for local storage (file:// dropped), else the URI with
    no trailing slash."""
    text = str(uri)
    if is_local(text):
        if text.startswith("file://"):
            text = urlsplit(text).path
        return str(Path(text).expanduser().resolve())
    base, _, query = text.partition("?")
    return base.rstrip("/") + (f"?{query}" if query else "")


def join(uri: str | Path, *parts: str) -> str:
    """`uri/part/...`; a URI keeps its query (`?endpoint_override=...`) at the end."""
    text = normalize(uri)
    if is_local(text):
        return str(Path(text).joinpath(*parts))
    base, _, query = text.partition("?")
    tail = "/".join(p.strip("/") for p in parts if p)
    return f"{base}/{tail}" + (f"?{query}" if query else "") if tail else text


def name(uri: str | Path) -> str:
    """The last part of a location's path."""
    return normalize(uri).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str | Path) -> str:
    """The location one level up."""
    text = normalize(uri)
    if is_local(text):
        return str(Path(text).parent)
    base, _, query = text.partition("?")
    return base.rsplit("/", 1)[0] + (f"?{query}" if query else "")


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a location. Raises StorageError for a scheme pyarrow does not know
    or a URI it cannot parse, naming the URI."""
    text = normalize(uri)
    if is_local(text):
        return pafs.LocalFileSystem(), text
    base, _, query = text.partition("?")
    parts = urlsplit(base)
    fs = _filesystem(parts.scheme, parts.netloc, query)
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str, query: str) -> pafs.FileSystem:
    uri = f"{scheme}://{bucket}" + (f"?{query}" if query else "")
    try:
        return pafs.FileSystem.from_uri(uri)[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
        raise StorageError(f"storage {uri}: pyarrow cannot open it ({err}); use a local path, file://PATH, "
                           f"s3://BUCKET/PREFIX or gs://BUCKET/PREFIX") from err


def uri_of(root: str | Path, fs_path: str) -> str:
    """The URI of `fs_path`, a path inside the filesystem of `root` (as Ray's checkpoints carry it)."""
    text = normalize(root)
    if is_local(text):
        return str(Path(fs_path))
    base, _, query = text.partition("?")
    return f"{urlsplit(base).scheme}://{fs_path.lstrip('/')}" + (f"?{query}" if query else "")


def exists(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str | Path) -> bytes:
    """The whole object; StorageError naming it when it is missing or unreadable."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise StorageError(f"{uri} is missing") from err
    except (OSError, pa.ArrowException) as err:
        raise StorageError(f"{uri} is unreadable: {err}") from err


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Writes one object whole (object stores publish it only when the stream closes)."""
    fs, path = resolve(uri)
    if is_local(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete(uri: str | Path) -> None:
    """Removes an object or a folder with everything in it; nothing when it is not there."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_names(uri: str | Path) -> list[str]:
    """Names of the entries directly under a folder (empty when it does not exist)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def upload(local_dir: str | Path, uri: str | Path, *, last: str | None = None) -> str:
    """Copies a local folder's files to `uri` in object storage, the file `last` (a path relative to the folder)
    after all others: object stores have no rename, so a marker written last is what makes the folder complete
    (local targets go through `publish`, which renames)."""
    local_dir = Path(local_dir)
    fs, path = resolve(uri)
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    ordered = [f for f in files if f != last] + ([last] if last in files else [])
    for rel in ordered:
        pafs.copy_files(str(local_dir / rel), f"{path}/{rel}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    return normalize(uri)


def publish(local_dir: str | Path, uri: str | Path, *, last: str) -> str:
    """Puts a finished local folder at `uri` so that readers never see it half-written: on local disk a copy
    beside the target renamed into place, in object storage an upload with the marker `last` written last. When
    a complete copy is already there (a concurrent run published the same content), it is kept."""
    if not is_local(uri):
        if not is_file(join(uri, last)):
            upload(local_dir, uri, last=last)
        return normalize(uri)
    target = Path(normalize(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run published it first
    return str(target)


def probe(uri: str | Path, tag: str, *, timeout_s: float = 90.0) -> None:
    """Writes, reads back and removes a small object under `uri`; StorageError naming the URI, what failed and
    what to set when any of it fails (a missing bucket, missing credentials, an unreachable endpoint) or when the
    store gives no answer within `timeout_s` (a cloud SDK looking for credentials on a network it cannot reach)."""
    text = normalize(uri)
    outcome: list[BaseException | None] = []
    worker = threading.Thread(target=lambda: outcome.append(_probe_once(text, tag)), daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise StorageError(f"storage {text} gave no answer within {timeout_s:g} s. {_hint(text)}")
    if outcome[0] is not None:
        raise outcome[0]


def _probe_once(text: str, tag: str) -> StorageError | None:
    target = join(text, ".probe", tag)
    payload = f"probe {tag}".encode()
    try:
        write_bytes(target, payload)
        back = read_bytes(target)
        delete(target)
    except (OSError, pa.ArrowException) as err:
        return StorageError(f"storage {text} cannot be written and read back: {err}. {_hint(text)}")
    if back != payload:
        return StorageError(f"storage {text} returned other bytes than were written to {target}. {_hint(text)}")
    return None


def _hint(uri: str) -> str:
    scheme = urlsplit(uri).scheme
    if scheme in CREDENTIALS_HINT:
        return f"Check that the bucket exists and is reachable, and {CREDENTIALS_HINT[scheme]}."
    return "Check that the folder exists and is writable."
