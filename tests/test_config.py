"""The command line generated from a job's pydantic model: help, YAML, flags, errors."""

from __future__ import annotations

from typing import Literal

import pytest

from pipeline.config import Device, JobConfig, Size, flag_of, new_parser, option, parse_config
from pipeline.errors import ConfigError
from pipeline.extract import ExtractConfig


class Example(JobConfig):
    source: str = option(help="where the images are", positional=True)
    out: str = option(help="output folder")
    k: int = option(10, "results per query", flag="-k", ge=1)
    layer: Literal["fc7", "fc6"] = option("fc7", "layer")
    device: Device = option("auto", "device")
    memory: Size = option("2GiB", "memory", metavar="SIZE", validate_default=True)
    images: list[str] = option([], "image files", flag="--image", metavar="PATH")
    normalize: bool = option(True, "L2-normalise first")
    overwrite: bool = option(False, "replace the output")


def test_help_lists_every_field_with_its_default():
    text = new_parser(Example, "fc7 example", "An example.").format_help()
    for line in ("-k K ", "results per query (default: 10)", "--layer {fc7,fc6}",
                 "(default: 2GiB)", "--image PATH [PATH ...]", "--normalize, --no-normalize",
                 "(default: on)", "replace the output (default: off)", "output folder "
                 "(default: required)", "SOURCE"):
        assert line in text, line


def test_flags_override_yaml_and_values_are_validated(tmp_path):
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("source: photos\nout: from-yaml\nk: 3\nmemory: 1GB\nnormalize: false\n")
    config = parse_config(Example, ["--config", str(yaml_file), "--out", "from-flag"],
                          "fc7 example", "")
    assert (config.source, config.out, config.k) == ("photos", "from-flag", 3)
    assert config.memory == 1_000_000_000 and config.normalize is False
    config = parse_config(Example, ["p", "--out", "o", "--memory", "512MiB", "--no-normalize",
                                    "--image", "a.jpg", "b.jpg", "--overwrite"], "x", "")
    assert config.memory == 512 * 1024**2 and config.images == ["a.jpg", "b.jpg"]
    assert config.overwrite and not config.normalize


def test_gpu_is_an_alias_of_cuda():
    assert parse_config(Example, ["p", "--out", "o", "--device", "gpu"], "x", "").device == "cuda"
    assert parse_config(Example, ["p", "--out", "o", "--device", "cuda"], "x", "").device == "cuda"


def test_every_problem_is_named_by_its_flag(tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse_config(Example, ["p", "-k", "0", "--layer", "fc9", "--device", "tpu",
                               "--memory", "lots"], "x", "")
    message = str(caught.value)
    for part in ("--out is required", "-k 0: Input should be greater than or equal to 1",
                 "--layer fc9", "--device tpu", "--memory lots"):
        assert part in message, part
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("out: o\nsource: s\nbatch: 3\n")
    with pytest.raises(ConfigError, match=f"unknown option 'batch' in {yaml_file}"):
        parse_config(Example, ["--config", str(yaml_file)], "x", "")
    yaml_file.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(Example, ["--config", str(yaml_file)], "x", "")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(Example, ["--config", str(tmp_path / "missing.yaml")], "x", "")


def test_flag_names_follow_the_declaration():
    assert flag_of(Example, "k") == "-k"
    assert flag_of(Example, "images") == "--image"
    assert flag_of(Example, "source") == "SOURCE"
    assert flag_of(ExtractConfig, "batch_size") == "--batch-size"


def test_the_bundled_yaml_configs_are_valid_for_their_jobs():
    from pathlib import Path

    import yaml

    from pipeline.classify import TrainConfig
    from pipeline.index import IndexConfig

    repo = Path(__file__).resolve().parents[1]
    for name, model in (("extract", ExtractConfig), ("index", IndexConfig),
                        ("train", TrainConfig)):
        values = yaml.safe_load((repo / "configs" / f"{name}.yaml").read_text())
        assert set(values) <= set(model.model_fields), name
        required = {key: "x" for key, info in model.model_fields.items() if info.is_required()}
        model.model_validate({**required, **values})
