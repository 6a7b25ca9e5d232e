"""ftd.config: precedence (flag > FTD_* env > default), validation, sizes, and derived defaults."""

from __future__ import annotations

import argparse
import os

import pytest

from ftd.config import (
    CLIENT,
    DAEMON,
    KNOWN_ENV,
    SETTINGS,
    ClientConfig,
    DaemonConfig,
    add_arguments,
    check_environment,
    default_socket,
    overrides_from,
    parse_bool,
    parse_job,
    parse_size,
)
from ftd.errors import ConfigError


def _daemon(tmp_path, environ=None, **overrides) -> DaemonConfig:
    overrides.setdefault("shm_dir", str(tmp_path / "shm"))
    return DaemonConfig.load(environ={} if environ is None else environ, **overrides)


# ---- precedence -------------------------------------------------------------------------------


def test_defaults_apply_with_empty_environment(tmp_path):
    cfg = DaemonConfig.load(environ={})
    defaults = {s.name: s.default for s in SETTINGS}
    assert cfg.job == "default"  # no FTD_JOB and no launcher identity
    assert cfg.keep == defaults["keep"]
    assert cfg.memory_budget == defaults["memory_budget"]
    assert cfg.memory_reserve == defaults["memory_reserve"]
    assert cfg.shm_dir == defaults["shm_dir"]
    assert cfg.node  # filled from the host name
    client = ClientConfig.load(environ={})
    assert client.enabled is True
    assert client.chunk_bytes == defaults["chunk_bytes"]


def test_environment_overrides_default(tmp_path):
    env = {"FTD_KEEP": "5", "FTD_MEMORY_BUDGET": "2GiB", "FTD_JOB": "envjob", "FTD_SHM_DIR": str(tmp_path)}
    cfg = DaemonConfig.load(environ=env)
    assert (cfg.keep, cfg.memory_budget, cfg.job, cfg.shm_dir) == (5, 2 << 30, "envjob", str(tmp_path))


def test_flag_overrides_environment(tmp_path):
    env = {"FTD_KEEP": "5", "FTD_JOB": "envjob", "FTD_RPC_TIMEOUT": "3"}
    cfg = DaemonConfig.load(environ=env, keep=7, job="flagjob")
    assert (cfg.keep, cfg.job) == (7, "flagjob")
    client = ClientConfig.load(environ=env, rpc_timeout="1.5")
    assert client.rpc_timeout == 1.5
    assert client.job == "envjob"


def test_argparse_flags_override_environment_and_unset_flags_do_not(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser, DAEMON)
    args = parser.parse_args(["--keep", "9", "--shm-dir", str(tmp_path / "x")])
    overrides = overrides_from(args, DAEMON)
    assert overrides == {"keep": "9", "shm_dir": str(tmp_path / "x")}  # unset flags stay out
    cfg = DaemonConfig.load(environ={"FTD_KEEP": "3", "FTD_MEMORY_RESERVE": "1k"}, **overrides)
    assert cfg.keep == 9
    assert cfg.shm_dir == str(tmp_path / "x")
    assert cfg.memory_reserve == 1024  # from the environment: no flag given


def test_add_arguments_only_adds_settings_of_the_scope():
    parser = argparse.ArgumentParser()
    add_arguments(parser, CLIENT)
    with pytest.raises(SystemExit):
        parser.parse_args(["--keep", "3"])  # a daemon-only setting
    args = parser.parse_args(["--chunk-bytes", "8KiB"])
    assert overrides_from(args, CLIENT) == {"chunk_bytes": "8KiB"}


def test_none_override_falls_back_to_environment():
    cfg = DaemonConfig.load(environ={"FTD_KEEP": "4"}, keep=None)
    assert cfg.keep == 4


# ---- unknown settings -------------------------------------------------------------------------


def test_unknown_ftd_env_rejected_naming_it():
    with pytest.raises(ConfigError) as err:
        DaemonConfig.load(environ={"FTD_KEPP": "3", "FTD_JOB": "a"})
    assert "FTD_KEPP" in str(err.value)
    assert "FTD_JOB" not in str(err.value).split(";")[0]  # only the unknown one is blamed


def test_every_unknown_ftd_env_is_named():
    with pytest.raises(ConfigError) as err:
        check_environment({"FTD_ZZZ": "1", "FTD_AAA": "2", "HOME": "/root"})
    assert "FTD_AAA" in str(err.value) and "FTD_ZZZ" in str(err.value)


def test_unknown_env_rejected_for_client_too():
    with pytest.raises(ConfigError, match="FTD_ENABLE\\b"):
        ClientConfig.load(environ={"FTD_ENABLE": "0"})


def test_non_ftd_env_and_known_env_of_other_scope_are_accepted():
    cfg = DaemonConfig.load(environ={"PATH": "/bin", "FTDX": "1", "FTD_ENABLED": "0", "FTD_CHUNK_BYTES": "8k"})
    assert cfg.keep == 2
    assert "FTD_ENABLED" in KNOWN_ENV


def test_unknown_override_rejected():
    with pytest.raises(ConfigError, match="kep"):
        DaemonConfig.load(environ={}, kep=3)
    with pytest.raises(ConfigError, match="enabled"):
        DaemonConfig.load(environ={}, enabled=False)  # a client setting given to the daemon


# ---- malformed values -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["lots", "-1", "12QB", "", "1.2.3", "0x10"])
def test_bad_size_rejected(value):
    with pytest.raises(ConfigError, match="byte size"):
        DaemonConfig.load(environ={"FTD_MEMORY_BUDGET": value})


@pytest.mark.parametrize("env", [{"FTD_MEMORY_BUDGET": "lots"}, {"FTD_ENABLED": "maybe"}])
def test_bad_value_message_names_the_variable(env):
    loader = ClientConfig.load if "FTD_ENABLED" in env else DaemonConfig.load
    with pytest.raises(ConfigError) as err:
        loader(environ=env)
    assert next(iter(env)) in str(err.value)


@pytest.mark.parametrize("value", ["maybe", "2", "", "truee"])
def test_bad_bool_rejected(value):
    with pytest.raises(ConfigError, match="boolean"):
        ClientConfig.load(environ={"FTD_ENABLED": value})


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                            ("0", False), ("False", False), ("no", False), ("OFF", False)])
def test_bool_spellings(value, expected):
    assert parse_bool(value) is expected
    assert ClientConfig.load(environ={"FTD_ENABLED": value}).enabled is expected


def test_bad_int_rejected_naming_the_source():
    with pytest.raises(ConfigError) as err:
        DaemonConfig.load(environ={"FTD_KEEP": "two"})
    assert "FTD_KEEP" in str(err.value)
    with pytest.raises(ConfigError) as err:
        DaemonConfig.load(environ={}, keep="2.5")
    assert "--keep" in str(err.value)


@pytest.mark.parametrize("keep", ["0", "-3"])
def test_keep_below_one_rejected(keep):
    with pytest.raises(ConfigError, match="keep"):
        DaemonConfig.load(environ={"FTD_KEEP": keep})


@pytest.mark.parametrize("job", ["", "-lead", ".hidden", "a/b", "a b", "x" * 65, "job!", "é", "../up"])
def test_bad_job_rejected(job):
    with pytest.raises(ConfigError, match="job id"):
        DaemonConfig.load(environ={"FTD_JOB": job})
    with pytest.raises(ConfigError):
        ClientConfig.load(environ={}, job=job)


@pytest.mark.parametrize("job", ["a", "A-b_c.d", "7", "x" * 64])
def test_good_job_accepted(job):
    assert parse_job(job) == job


def test_job_with_trailing_newline_rejected():
    with pytest.raises(ConfigError):
        parse_job("abc\n")


@pytest.mark.parametrize("env", [{"FTD_CHUNK_BYTES": "100"}, {"FTD_CHUNK_BYTES": "4097"},
                                 {"FTD_CHUNK_BYTES": "2k"}, {"FTD_RPC_TIMEOUT": "0"},
                                 {"FTD_MAX_STALL": "-1"}, {"FTD_RPC_TIMEOUT": "soon"}])
def test_client_ranges_checked(env):
    with pytest.raises(ConfigError):
        ClientConfig.load(environ=env)


def test_client_replace_returns_changed_copy():
    cfg = ClientConfig.load(environ={})
    other = cfg.replace(job="b")
    assert other.job == "b" and cfg.job == "default"


# ---- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("0", 0), ("4096", 4096), (" 4096 ", 4096), ("17b", 17), ("17B", 17),
    ("1k", 1 << 10), ("1K", 1 << 10), ("1kb", 1000), ("1KiB", 1 << 10),
    ("512MiB", 512 << 20), ("3m", 3 << 20), ("3MB", 3 * 10**6),
    ("8G", 8 << 30), ("8GB", 8 * 10**9), ("8gib", 8 << 30),
    ("2T", 2 << 40), ("2TB", 2 * 10**12), ("2TiB", 2 << 40),
    ("1.5KiB", 1536), ("0.5 GiB", 1 << 29),
])
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


def test_parse_size_passes_ints_through():
    assert parse_size(12345) == 12345


def test_sizes_from_environment_and_flags():
    cfg = DaemonConfig.load(environ={"FTD_MEMORY_RESERVE": "1.5KiB"}, memory_budget="2MB")
    assert (cfg.memory_reserve, cfg.memory_budget) == (1536, 2 * 10**6)


# ---- derived defaults -------------------------------------------------------------------------


def test_socket_default_derived_from_job_in_a_directory_of_the_user():
    own = "/run/ftd" if os.geteuid() == 0 else f"/tmp/ftd-{os.geteuid()}"
    assert DaemonConfig.load(environ={"FTD_JOB": "abc"}).socket == f"{own}/ftd-abc.sock"
    assert DaemonConfig.load(environ={}).socket == f"{own}/ftd-default.sock"
    job = f"cfg-{os.getpid()}"  # a job whose socket exists nowhere: the trainer looks in its own user's directory
    assert ClientConfig.load(environ={}, job=job).socket == f"{own}/ftd-{job}.sock"
    assert default_socket("j", 0) == "/run/ftd/ftd-j.sock" and default_socket("j", 1234) == "/tmp/ftd-1234/ftd-j.sock"


def test_explicit_socket_wins(tmp_path):
    sock = str(tmp_path / "s.sock")
    assert DaemonConfig.load(environ={"FTD_SOCKET": sock, "FTD_JOB": "abc"}).socket == sock
    assert ClientConfig.load(environ={"FTD_SOCKET": "ignored"}, socket=sock).socket == sock


def test_daemon_and_client_agree_through_environment_alone(tmp_path):
    env = {"FTD_JOB": "shared", "FTD_SOCKET": str(tmp_path / "d.sock"), "FTD_ENABLED": "0", "FTD_KEEP": "3"}
    d, c = DaemonConfig.load(environ=env), ClientConfig.load(environ=env)
    assert (d.job, d.socket) == (c.job, c.socket)
    assert d.keep == 3 and c.enabled is False


def test_node_default_is_hostname_and_can_be_set():
    import socket

    assert DaemonConfig.load(environ={}).node == socket.gethostname()
    assert DaemonConfig.load(environ={"FTD_NODE": "n7"}).node == "n7"


def test_config_is_frozen(tmp_path):
    cfg = _daemon(tmp_path)
    with pytest.raises(Exception):
        cfg.keep = 3  # type: ignore[misc]


@pytest.mark.parametrize("env", [{"FTD_RPC_TIMEOUT": "nan"}, {"FTD_MAX_STALL": "nan"}, {"FTD_MAX_STALL": "inf"}])
def test_non_finite_timeouts_rejected(env):
    with pytest.raises(ConfigError):
        ClientConfig.load(environ=env)


def test_negative_int_size_rejected():
    with pytest.raises(ConfigError):
        DaemonConfig.load(environ={}, memory_budget=-1)
