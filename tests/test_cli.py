"""`fc7` and the job scripts: commands, help, exit codes, one line per error."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from jobs import run
from jobs.cli import COMMANDS
from jobs.cli import main as fc7
from pipeline.errors import ConfigError, SourceError


def test_usage_lists_every_command_and_the_version(capsys):
    assert fc7(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {name} " in usage for name in COMMANDS)
    assert fc7([]) == 2 and capsys.readouterr().out == usage
    assert fc7(["--version"]) == 0 and capsys.readouterr().out.startswith("fc7 0.")
    assert fc7(["extrakt"]) == 2 and "unknown command 'extrakt'" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_of_every_command_says_its_default(command, capsys):
    with pytest.raises(SystemExit) as done:
        fc7([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: fc7 {command}")
    # Every flag's entry in the help (all lines up to the next flag) ends with its default.
    options = text.split("\noptions:\n")[1].split("\n\n")[0]
    entries = ("\n" + options).split("\n  -")[1:]
    assert len(entries) > 2, text
    for entry in entries:
        if not entry.startswith("h, --help"):
            words = " ".join(entry.split())
            assert words.endswith(")") and "(default: " in words, words


def test_errors_are_one_line_with_an_exit_status(capsys):
    def bad_flag(argv):
        raise ConfigError("--k 0: must be positive")

    def bad_input(argv):
        raise SourceError("photos/: no such folder")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run("extract", bad_flag, []) == 2
    assert capsys.readouterr().err == "fc7 extract: error: --k 0: must be positive\n"
    assert run("index", bad_input, []) == 1
    assert capsys.readouterr().err == "fc7 index: error: photos/: no such folder\n"
    assert run("serve", interrupted, []) == 130
    assert capsys.readouterr().err == "fc7 serve: interrupted\n"


SCRIPTS = ["extract", "build_index", "query", "train_classifier", "predict", "serve",
           "duplicates", "audit", "map", "finetune"]


@pytest.fixture(scope="module")
def script_helps(tmp_path_factory):
    """`python jobs/SCRIPT.py --help` for every script, all started at once: each is seconds
    of imports on one core, and the machine has more."""
    home = tmp_path_factory.mktemp("home")
    # From another folder, without the package on sys.path: as `ray job submit` runs them.
    runs = {
        script: subprocess.Popen([sys.executable, str(REPO / "jobs" / f"{script}.py"), "--help"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=home, env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
        for script in SCRIPTS
    }
    yield runs
    for process in runs.values():
        if process.poll() is None:  # a test failed before reading it
            process.kill()
            process.communicate()


@pytest.mark.parametrize("script", SCRIPTS)
def test_job_scripts_run_as_plain_python_files_as_ray_job_submit_runs_them(script, script_helps):
    stdout, stderr = script_helps[script].communicate(timeout=120)
    assert script_helps[script].returncode == 0, stderr
    assert "usage:" in stdout and "(default: " in stdout


def test_a_bad_value_exits_2_naming_the_flag():
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "extract", "photos", "--out", "o",
                           "--batch-size", "0"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("fc7 extract: error: --batch-size 0: Input should be "
                                   "greater than 0")


@pytest.mark.parametrize(("name", "model"), [
    ("extract", "pipeline.extract.config:ExtractConfig"),
    ("index", "pipeline.index.config:IndexConfig"),
    ("train", "pipeline.classify.config:TrainConfig"),
    ("duplicates", "pipeline.curate.config:DuplicatesConfig"),
    ("audit", "pipeline.curate.config:AuditConfig"),
    ("map", "pipeline.curate.config:MapConfig"),
    ("finetune", "pipeline.finetune.config:FinetuneConfig"),
])
def test_each_yaml_config_is_valid_and_shows_every_option_at_its_default(name, model):
    import importlib

    import yaml

    module, _, class_name = model.partition(":")
    config_model = getattr(importlib.import_module(module), class_name)
    values = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    fields = config_model.model_fields
    assert set(values) <= set(fields), f"{name}.yaml: unknown keys"
    optional = {field for field, info in fields.items() if not info.is_required()}
    assert optional <= set(values), f"{name}.yaml does not show {sorted(optional - set(values))}"
    # Validated both ways, so that "2GiB" and 2147483648 compare equal. Required values a
    # file leaves to the command line get a placeholder.
    required = {field: values.get(field, "placeholder") for field in set(fields) - optional}
    values = {**required, **values}
    shown = config_model.model_validate(values).model_dump()
    defaults = config_model.model_validate(required).model_dump()
    assert {field: shown[field] for field in optional} == {
        field: defaults[field] for field in optional}
