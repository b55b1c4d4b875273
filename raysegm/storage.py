"""Where runs, checkpoints and outputs live: a local path or any URI pyarrow.fs reads (s3://, gs://, ...).

Torch-free, so the inference driver and the export tool import it without the model stack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path in it) of a local path (made absolute) or a URI."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def _in_working_dir_job() -> bool:
    """Whether this driver is a job submitted with `ray job submit --working-dir`."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def _relative(value: str) -> bool:
    """Neither a URI nor an absolute path; "" too (it resolves to the current directory)."""
    return "://" not in value and not Path(value).expanduser().is_absolute()


def check_job_inputs(**locations: str) -> None:
    """Name a relative input location (data folder, manifest, archive, checkpoint) that a job submitted
    with a working directory cannot see: its driver runs in a temporary copy of that directory, which
    Ray uploads without what .gitignore lists (data/, scratch/, runs/), so `data/kaggle_3m` of the
    checkout is not there. Relative inputs that did travel with it are fine; empty ones are not given."""
    if not _in_working_dir_job():
        return
    missing = [f"{name} {value!r}" for name, value in locations.items()
               if value and _relative(value) and not Path(value).exists()]
    if missing:
        raise ValueError(f"{', '.join(missing)} is relative and not in this job's copy of its working directory "
                         f"({os.getcwd()}; `ray job submit` leaves out what .gitignore lists): give an absolute "
                         f"path every node can reach (a shared mount) or a URI")


def check_job_data(data) -> None:
    """`check_job_inputs` for a config's data section: its manifest where given (discovery then ignores
    data_dir), else its data_dir."""
    check_job_inputs(**({"data.manifest": data.manifest} if data.manifest
                        else {"data.data_dir": data.data_dir}))


def check_job_outputs(**locations: str) -> None:
    """Refuse relative output locations in a job submitted with a working directory (`ray job submit
    --working-dir`): its driver runs in a temporary copy of that directory, on the head node only,
    which a later submission replaces, so a relative run folder or output would be written there."""
    if not _in_working_dir_job():
        return
    relative = [f"{name} {value!r}" for name, value in locations.items() if _relative(value)]
    if relative:
        raise ValueError(f"{', '.join(relative)} is relative, and this job runs in a temporary copy of its "
                         f"working directory ({os.getcwd()}): give an absolute path every node can reach "
                         f"(a shared mount)")


def replace_atomically(path: str | Path, write) -> None:
    """Call `write(temporary)` on a hidden temporary file beside local `path`, then rename it to `path`.

    A crash leaves either the old file or the new one, never a truncated one. The temporary name keeps
    `path`'s suffixes (nibabel and Pillow go by them) and is removed when `write` raises.
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # hidden: discovery and listings skip it
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def best_checkpoint_of(location: str | Path) -> str:
    """The checkpoint a location stands for: a run folder's best one (named by its result.json), else itself.

    `location` is a local path or a URI pyarrow reads; a run without a best checkpoint is a ValueError.
    """
    fs, base = filesystem(str(location))
    result = f"{base.rstrip('/')}/result.json"
    if fs.get_file_info(result).type != pafs.FileType.File:
        return str(location)
    with fs.open_input_stream(result) as stream:
        best = json.loads(stream.read()).get("best_checkpoint")
    if not best:
        raise ValueError(f"{location}: its result.json names no best checkpoint")
    return str(best)
