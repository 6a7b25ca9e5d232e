"""Job and run identity from the launcher's environment (issue: two runs of one job id restored each other)."""

from __future__ import annotations

import pytest

from ftd.config import ClientConfig, DaemonConfig
from ftd.errors import ConfigError


def test_the_job_defaults_to_slurms_job_id_on_both_sides():
    env = {"SLURM_JOB_ID": "4711"}
    assert ClientConfig.load(env).job == DaemonConfig.load(env).job == "4711"


def test_ftd_job_wins_and_without_a_launcher_the_job_is_default():
    assert ClientConfig.load({"SLURM_JOB_ID": "4711", "FTD_JOB": "mine"}).job == "mine"
    assert ClientConfig.load({}).job == DaemonConfig.load({}).job == "default"
    assert ClientConfig.load({"SLURM_JOB_ID": "not a valid/id"}).job == "default"


@pytest.mark.parametrize(("env", "run"), [
    ({"TORCHELASTIC_RUN_ID": "3f2a-uuid"}, "3f2a-uuid"),
    ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "4711"}, "4711"),  # torchrun's default rdzv id names nothing
    ({"TORCHELASTIC_RUN_ID": "none"}, ""),
    ({"TORCHELASTIC_RUN_ID": "abc", "FTD_RUN": "pinned"}, "pinned"),
    ({}, ""),
])
def test_the_run_comes_from_the_launcher(env, run):
    assert ClientConfig.load(env).run == run


def test_a_run_id_must_be_printable_and_short():
    with pytest.raises(ConfigError, match="run id"):
        ClientConfig.load({"FTD_RUN": "x" * 129})
    with pytest.raises(ConfigError, match="run id"):
        ClientConfig.load({"FTD_RUN": "a\nb"})
