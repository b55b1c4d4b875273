"""Shared fixtures: one local Ray per test session, the shared LGG sample, and synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
LGG_SAMPLE = SHARED_DATA / "lgg-sample" / "kaggle_3m"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def lgg_sample() -> Path:
    """The 4-patient LGG sample in ../shared/data; skipped where that folder is absent, a failure where it
    is there without the sample (a moved path must not turn the LGG tests into skips)."""
    if not LGG_SAMPLE.is_dir():
        if SHARED_DATA.is_dir():
            pytest.fail(f"{SHARED_DATA} is here but holds no LGG sample at {LGG_SAMPLE}")
        pytest.skip(f"LGG sample not found at {LGG_SAMPLE} (../shared/data is absent in this checkout)")
    return LGG_SAMPLE


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic kaggle_3m dataset: 6 patients x 12 slices at 64 px, seed 0."""
    from raysegm.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth") / "kaggle_3m"
    generate_dataset(out, patients=6, slices=12, size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting Ray costs seconds).

    4 logical CPUs on 2 physical cores so Train workers and Ray Data tasks never wait on each other,
    and the dashboard on: without it Tune leaks the placement groups of stopped trials (seen on Ray 2.60).
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=True, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
