"""How `fc7 extract` chooses where to run (where replicas go: test_layout.py)."""

from __future__ import annotations

import pytest

from pipeline.extract import ExtractConfig, choose_runner
from pipeline.extract.runner import SMALL_JOB_IMAGES


@pytest.mark.parametrize(
    ("options", "images", "expected"),
    [
        ({"num_workers": 1}, 10**6, "local"),  # one worker: Ray would only add its start-up
        ({"num_workers": 2}, SMALL_JOB_IMAGES - 1, "local"),  # small: not worth starting Ray
        ({"num_workers": 2}, SMALL_JOB_IMAGES, "ray"),
        ({"num_workers": 1, "runner": "ray"}, 10, "ray"),
        ({"num_workers": 4, "runner": "local"}, 10**6, "local"),
    ],
)
def test_auto_runs_here_unless_ray_would_start_several_workers_for_a_large_job(
    options, images, expected, monkeypatch
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = ExtractConfig(source="photos", out="out", **options)
    assert choose_runner(config, images) == expected


def test_a_cluster_address_always_means_ray(monkeypatch):
    # `ray job submit` sets RAY_ADDRESS for the job's driver.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_runner(ExtractConfig(source="photos", out="out"), 5) == "ray"
