"""Local paths and bucket URLs alike: every file clipjax reads or writes goes through here.

A path is a local path or a `gs://` / `s3://` URL, handled by `etils.epath`: local files through
the OS, `gs://` through gcsfs and `s3://` through s3fs (`pip install 'clipjax[buckets]'`), which
take their credentials and endpoints from the usual settings (docs/checkpoints.md, "Buckets").
A URL is never turned into a local path. Checkpoint arrays go through tensorstore's own drivers
instead (`clipjax.checkpoint`).

Object stores have no directories, no rename and no append: `makedirs` is a no-op there, a file
is written whole in one request (which an object store applies atomically), and appending
writers rewrite the object (`clipjax.metric_writer`).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile

from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def resolve(path) -> str:
    """A local path made absolute (`~` expanded); a bucket URL as given, less a trailing '/'."""
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(os.path.expanduser(path))


def path(p) -> epath.Path:
    return epath.Path(resolve(p))


def join(base, *parts: str) -> str:
    return str(path(base).joinpath(*parts))


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def makedirs(p) -> None:
    """Create a local directory; nothing to do in a bucket, where folders are key prefixes."""
    if not is_remote(p):
        os.makedirs(resolve(p), exist_ok=True)


def read_text(p) -> str:
    return read_bytes(p).decode("utf-8")


def read_bytes(p) -> bytes:
    """The whole file as it was at one moment.

    In a bucket: one GET of the whole object, so an object rewritten meanwhile (a lock's
    heartbeat, metrics.jsonl) is read old or new, never a mix. A file object would not do: gcsfs's
    reads the size first, then a byte range of whatever generation is current by then, unpinned,
    which cut a LOCK rewritten in between short (s3fs's pins the ETag and fails instead). s3fs
    reads objects over 50 MB in parallel ranges; only weights and images are that large, and
    they are not rewritten.
    """
    if not is_remote(p):
        return path(p).read_bytes()
    return _fs(p).cat_file(resolve(p))


def write_atomic(p, data: str | bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new, never a part.

    Locally: a temporary file beside it, renamed over it. In a bucket: one upload of the whole
    content, which the store applies atomically (there is no rename to lean on there).
    """
    blob = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(p):
        path(p).write_bytes(blob)
        return
    target = resolve(p)
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        # mkstemp makes the file 0600; these files are read by whoever shares the workdir.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def create_exclusive(p, data: str) -> None:
    """Create a file that must not exist yet; FileExistsError if it does.

    In a bucket this is a conditional upload (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`),
    through fsspec since epath has no exclusive mode. It is one request: gcsfs's file objects
    always upload in two (a resumable upload), and fake-gcs-server, the tests' GCS, ignores the
    precondition there. A store that ignores the condition (some S3-compatible ones) overwrites
    instead.
    """
    if is_remote(p):
        _fs(p).pipe_file(resolve(p), data.encode("utf-8"), mode="create")
        return
    fd = os.open(resolve(p), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def remove(p) -> None:
    """Delete a file; a missing one is not an error."""
    with contextlib.suppress(FileNotFoundError):
        path(p).unlink()


def relative(target, start) -> str:
    """`target` as a link from a file in `start`: relative where both are under one root
    (one local file system, or one bucket), else `target` itself."""
    target, start = resolve(target), resolve(start)
    if not is_remote(target) and not is_remote(start):
        return os.path.relpath(target, start)
    t_scheme, t_rest = target.split("://", 1) if is_remote(target) else ("", target)
    s_scheme, s_rest = start.split("://", 1) if is_remote(start) else ("", start)
    if t_scheme != s_scheme or t_rest.split("/")[0] != s_rest.split("/")[0]:
        return target
    return posixpath.relpath("/" + t_rest, "/" + s_rest)


def refresh(p) -> None:
    """Forget fsspec's cached listings of a bucket, so that files written since by another
    process (a trainer, while this one reads) are seen. Local paths need nothing."""
    if is_remote(p):
        _fs(p).invalidate_cache()


def _fs(p):
    """The fsspec file system epath uses for bucket URL `p` (one per scheme, whose listing
    cache is shared with epath's calls); epath has no public handle on it."""
    backend = getattr(path(p), "_backend", None)
    if hasattr(backend, "fs"):
        return backend.fs(resolve(p))
    import fsspec

    return fsspec.core.url_to_fs(resolve(p))[0]


def files_under(p) -> list[str]:
    """Every file below folder `p`, as paths relative to it ('/'-separated), sorted."""
    root = resolve(p)
    if not is_remote(root):
        found = []
        for folder, _, files in os.walk(root):
            found += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in files]
        return sorted(found)
    # epath's walk() does not work over s3fs; fsspec's find() lists a prefix in one go.
    scheme = root.split("://", 1)[0]
    prefix = root.split("://", 1)[1] + "/"
    found = []
    for key in _fs(root).find(root):
        key = key.split("://", 1)[1] if key.startswith(f"{scheme}://") else key
        if key.startswith(prefix):
            found.append(key[len(prefix) :])
    return sorted(found)


def _content_version(info: dict) -> str:
    """Size and what changes with an object's content, from an fsspec listing entry."""
    for key in ("ETag", "etag", "generation", "md5Hash", "LastModified", "updated", "mtime"):
        if info.get(key) is not None:
            return f"{info.get('size')}|{info[key]}"
    return str(info.get("size"))


def versions_under(p) -> dict[str, str]:
    """{path relative to bucket folder `p`: size and content version} of every object below it,
    in one listing (for fingerprints: a replaced object gets another version)."""
    root = resolve(p)
    scheme, prefix = root.split("://", 1)
    out = {}
    for key, info in _fs(root).find(root, detail=True).items():
        key = key.split("://", 1)[1] if key.startswith(f"{scheme}://") else key
        if key.startswith(prefix + "/"):
            out[key[len(prefix) + 1 :]] = _content_version(info)
    return dict(sorted(out.items()))


def content_version(p) -> str | None:
    """Size and content version of bucket object `p`, None when it does not exist."""
    try:
        return _content_version(_fs(p).info(resolve(p)))
    except (FileNotFoundError, OSError, ValueError):
        return None


def local_cache(url: str) -> str:
    """The local folder that mirrors bucket folder `url`: under $CLIPJAX_CACHE_DIR, else
    ~/.cache/clipjax, at buckets/<scheme>/<bucket>/<path>."""
    root = os.environ.get("CLIPJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "clipjax")
    scheme, rest = resolve(url).split("://", 1)
    return os.path.join(os.path.abspath(root), "buckets", scheme, *rest.split("/"))


def upload_tree(local_dir: str, target, *, last: tuple[str, ...] = ()) -> None:
    """Copy every file under `local_dir` to the same relative place under `target` (one
    whole-object write each); `last` names files (relative paths) to write after all others,
    such as the one whose presence says the copy is complete."""
    names = files_under(local_dir)
    for rel in sorted(names, key=lambda n: n in last):
        with open(os.path.join(local_dir, *rel.split("/")), "rb") as f:
            write_atomic(join(target, *rel.split("/")), f.read())


def download_tree(source, local_dir: str) -> None:
    """Copy every file under `source` (a bucket folder) into `local_dir`, replacing it whole:
    the files go to a temporary folder beside it that is renamed at the end, so a copy cut
    short is never taken for a complete one."""
    parent = os.path.dirname(os.path.abspath(local_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(local_dir)}.", suffix=".tmp")
    try:
        for rel in files_under(source):
            out = os.path.join(staging, *rel.split("/"))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as f:
                f.write(read_bytes(join(source, *rel.split("/"))))
        if os.path.isdir(local_dir):
            shutil.rmtree(local_dir)
        os.replace(staging, local_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
