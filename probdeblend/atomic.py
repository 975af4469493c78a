"""Atomic, non-destructive file outputs.

Every file probdeblend writes goes through :func:`atomic_path`: the content is written to a
hidden temporary file *in the target folder*, flushed to disk (``fsync``), and only then moved onto
the target with a single rename. A crash, ``SIGKILL`` or exception at any point therefore leaves
either the previous file intact or no file at all, never a fragment; the temporary file is removed
on failure (a ``SIGKILL`` can leave a hidden ``.<name>.<hex>.tmp*`` file behind, never the target).

An existing target is refused with :class:`~probdeblend.errors.OutputExistsError` unless
``overwrite=True``; the check is made again at the final rename (without ``overwrite``, a file
that appeared meanwhile is not replaced).

Format helpers: :func:`write_netcdf` (ArviZ InferenceData / xarray), :func:`write_fits`
(astropy HDUList, with checksums), :func:`write_table` (astropy Table: ECSV, FITS, CSV...),
:func:`save_torch` (checkpoints), :func:`save_numpy` / :func:`save_npz`, :func:`write_text`,
:func:`write_bytes` and :func:`write_json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ArgumentError, InputNotFoundError, OutputExistsError

__all__ = [
    "atomic_path",
    "check_writable",
    "fsync_file",
    "write_netcdf",
    "write_fits",
    "write_table",
    "save_torch",
    "save_numpy",
    "save_npz",
    "write_text",
    "write_bytes",
    "write_json",
]

_COMPRESSED = (".gz", ".bz2", ".xz", ".zip")


def _temp_name(path: Path) -> Path:
    """Hidden temporary sibling of ``path`` that keeps its extension (writers infer formats)."""
    suffix = path.suffix
    if suffix.lower() in _COMPRESSED and len(path.suffixes) >= 2:
        suffix = "".join(path.suffixes[-2:])
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's content to disk (call before renaming it into place)."""
    _fsync_file(Path(path))


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike, overwrite: bool = False,
                   argument: str = "path") -> Path:
    """Refuse an existing target unless ``overwrite``; return ``path`` as a :class:`Path`.

    Call this before starting expensive work whose result goes to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
    overwrite : bool, default False
    argument : str, default "path"
        Argument name recorded in the error.

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is False.
    ArgumentError
        ``path`` is a folder.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ArgumentError(argument, str(p), f"{str(p)!r} is a folder; give a file name")
    if not overwrite and os.path.lexists(p):
        raise OutputExistsError(p, argument=argument)
    return p


def _move_no_clobber(src: Path, dst: Path, argument: str) -> None:
    """Move ``src`` onto ``dst`` atomically, refusing to replace a ``dst`` that exists."""
    try:
        os.link(src, dst)  # atomic and never replaces an existing file
    except FileExistsError:
        raise OutputExistsError(dst, argument=argument) from None
    except OSError:  # filesystem without hard links: check, then rename (tiny race window)
        if os.path.lexists(dst):
            raise OutputExistsError(dst, argument=argument) from None
        os.replace(src, dst)
        return
    os.unlink(src)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False, *,
                argument: str = "path", make_parents: bool = True) -> Iterator[Path]:
    """Context manager yielding a temporary path that replaces ``path`` on success.

    Write the whole output to the yielded path inside the ``with`` block. On normal exit the
    temporary file is fsynced and renamed onto ``path`` (atomic on POSIX and Windows); on an
    exception it is deleted and ``path`` is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Final location.
    overwrite : bool, default False
        Replace an existing ``path``. Without it an existing file raises before the block runs.
    argument : str, default "path"
        Argument name recorded in :class:`~probdeblend.errors.OutputExistsError`.
    make_parents : bool, default True
        Create missing parent folders.

    Yields
    ------
    pathlib.Path
        Temporary file in the same folder as ``path``, with the same extension (so writers that
        infer the format from it work), not yet existing.

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is False (checked before and at the final rename).

    Examples
    --------
    >>> with atomic_path("result.nc", overwrite=True) as tmp:  # doctest: +SKIP
    ...     idata.to_netcdf(tmp)
    """
    target = check_writable(path, overwrite, argument)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        yield tmp
        if not tmp.exists():
            raise InputNotFoundError(tmp, f"the writer did not create the temporary file {tmp}")
        _fsync_file(tmp)
        if overwrite:
            os.replace(tmp, target)
        else:
            _move_no_clobber(tmp, target, argument)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.unlink(tmp)


def write_netcdf(data: Any, path: str | os.PathLike, overwrite: bool = False, **kwargs) -> Path:
    """Write an ArviZ ``InferenceData`` (or xarray Dataset) to NetCDF atomically.

    Parameters
    ----------
    data : arviz.InferenceData or xarray.Dataset
        Anything with a ``to_netcdf(path, **kwargs)`` method.
    path : str or os.PathLike
    overwrite : bool, default False
    **kwargs
        Passed to ``to_netcdf``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    with atomic_path(path, overwrite) as tmp:
        data.to_netcdf(str(tmp), **kwargs)
    return Path(path)


def write_fits(hdul: Any, path: str | os.PathLike, overwrite: bool = False,
               checksum: bool = True) -> Path:
    """Write an astropy ``HDUList`` (or single HDU) atomically, with HDU checksums by default.

    Paths ending in ``.gz`` / ``.bz2`` are compressed.

    Returns
    -------
    pathlib.Path
    """
    with atomic_path(path, overwrite) as tmp:
        hdul.writeto(tmp, checksum=checksum)
    return Path(path)


def write_table(table: Any, path: str | os.PathLike, overwrite: bool = False,
                format: str | None = None, **kwargs) -> Path:  # noqa: A002 - astropy's name
    """Write an astropy ``Table`` atomically (format from the extension unless ``format``).

    Parameters
    ----------
    table : astropy.table.Table
    path : str or os.PathLike
        ``.ecsv``, ``.fits``, ``.csv``, ``.hdf5``... as astropy's unified I/O understands them.
    overwrite : bool, default False
    format : str, optional
        Explicit astropy format name (``"ascii.ecsv"``, ``"fits"``).
    **kwargs
        Passed to ``Table.write``.

    Returns
    -------
    pathlib.Path
    """
    with atomic_path(path, overwrite) as tmp:
        table.write(tmp, format=format, **kwargs)
    return Path(path)


def save_torch(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """``torch.save(obj)`` atomically (checkpoints default to ``overwrite=True``).

    Returns
    -------
    pathlib.Path
    """
    import torch

    with atomic_path(path, overwrite) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_numpy(array: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``numpy.save`` atomically; no ``.npy`` is appended to ``path``.

    Returns
    -------
    pathlib.Path
    """
    import numpy as np

    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
    return Path(path)


def save_npz(path: str | os.PathLike, overwrite: bool = False, compressed: bool = False,
             **arrays: Any) -> Path:
    """``numpy.savez`` (or ``savez_compressed``) atomically; no ``.npz`` is appended.

    Returns
    -------
    pathlib.Path
    """
    import numpy as np

    writer = np.savez_compressed if compressed else np.savez
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as fh:
            writer(fh, **arrays)
    return Path(path)


def write_bytes(data: bytes, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write bytes atomically.

    Returns
    -------
    pathlib.Path
    """
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text(text: str, path: str | os.PathLike, overwrite: bool = False,
               encoding: str = "utf-8") -> Path:
    """Write text atomically.

    Returns
    -------
    pathlib.Path
    """
    return write_bytes(text.encode(encoding), path, overwrite)


def write_json(obj: Any, path: str | os.PathLike, overwrite: bool = False,
               indent: int | None = 2) -> Path:
    """Serialise ``obj`` to JSON (before touching the disk) and write it atomically.

    Returns
    -------
    pathlib.Path
    """
    text = json.dumps(obj, indent=indent) + "\n"
    return write_text(text, path, overwrite)
