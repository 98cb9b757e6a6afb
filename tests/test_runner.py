"""How `fc7 extract` chooses where to run, and lays its model replicas out on the resources
Ray reports."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.extract import ExtractConfig, choose_runner, worker_layout
from pipeline.extract.runner import SMALL_JOB_IMAGES


def layout(resources: dict, **options) -> tuple[int, int, bool]:
    return worker_layout(ExtractConfig(source="photos", out="out", **options), resources)


@pytest.mark.parametrize(
    ("resources", "options", "expected"),
    [
        ({"CPU": 2.0}, {}, (1, 2, False)),  # this machine: one replica with both cores
        ({"CPU": 16.0}, {}, (2, 8, False)),  # replicas of at most 8 threads
        ({"CPU": 12.0}, {}, (1, 8, False)),  # 12 // 8 replicas of 8 threads
        ({"CPU": 32.0, "GPU": 4.0}, {}, (4, 8, True)),  # one per GPU, the CPUs shared
        ({"CPU": 32.0, "GPU": 4.0}, {"device": "cpu"}, (4, 8, False)),
        ({"CPU": 16.0}, {"num_workers": 3, "cpus_per_worker": 2}, (3, 2, False)),
        ({"CPU": 16.0}, {"cpus_per_worker": 4}, (4, 4, False)),
        ({"CPU": 8.0, "GPU": 1.0}, {"device": "gpu"}, (1, 8, True)),
    ],
)
def test_replicas_follow_the_cluster_and_the_options(resources, options, expected):
    assert layout(resources, **options) == expected


def test_cuda_on_a_cluster_without_gpus_fails_before_any_actor_starts():
    with pytest.raises(ConfigError, match="--device cuda: the Ray cluster has no GPU"):
        layout({"CPU": 8.0}, device="cuda")


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
