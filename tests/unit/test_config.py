"""Unit tests for qm.config: layering, coercion, validation, shipped config.yaml."""

import dataclasses
from pathlib import Path

import pytest

from qm.config import Config, env_var_name, load_config, parse_host_port
from qm.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "config.yaml"


def write(tmp_path: Path, text: str, name: str = "qm.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs) -> ConfigError:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return info.value


# ------------------------------------------------------------- defaults ---


def test_defaults_without_any_source():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.broker.url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert cfg.broker.heartbeat_s == 30
    assert cfg.broker.reconnect_max_delay_s == 10.0
    assert cfg.broker.queue_type == "quorum"
    assert cfg.server.listen == "127.0.0.1:50051"
    assert cfg.server.data_dir == "qm-data"
    assert cfg.server.id == ""
    assert cfg.server.max_payload_bytes == 1048576
    assert cfg.server.grace_s == 5.0
    assert cfg.worker.procs == 0
    assert cfg.worker.queues == ["default"]
    assert cfg.worker.prefetch == "auto"
    assert cfg.worker.id == ""
    assert cfg.worker.start_method == "forkserver"
    assert cfg.client.server == "127.0.0.1:50051"
    assert cfg.log.level == "INFO"


def test_config_is_frozen():
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.listen = "x:1"  # type: ignore[misc]


def test_default_queue_list_not_shared():
    assert Config().worker.queues is not Config().worker.queues


# ----------------------------------------------------------- precedence ---


@pytest.mark.parametrize(
    "key, file_text, env_text, flag, expected",
    [
        (
            "server.listen", "'10.0.0.1:1'", "10.0.0.2:2", "10.0.0.3:3",
            ["127.0.0.1:50051", "10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"],
        ),
        ("worker.procs", "1", "2", 3, [0, 1, 2, 3]),
        ("broker.reconnect_max_delay_s", "1.5", "2.5", "3.5", [10.0, 1.5, 2.5, 3.5]),
        ("worker.queues", "[a]", "b", ["c"], [["default"], ["a"], ["b"], ["c"]]),
        ("log.level", "debug", "warning", "error", ["INFO", "DEBUG", "WARNING", "ERROR"]),
    ],
)
def test_each_layer_beats_the_one_below(tmp_path, key, file_text, env_text, flag, expected):
    section, name = key.split(".")
    path = write(tmp_path, f"{section}:\n  {name}: {file_text}\n")
    env = {env_var_name(section, name): env_text}
    get = lambda cfg: getattr(getattr(cfg, section), name)  # noqa: E731

    assert get(load_config(env={})) == expected[0]
    assert get(load_config(path, env={})) == expected[1]
    assert get(load_config(path, env=env)) == expected[2]
    assert get(load_config(path, env=env, overrides={key: flag})) == expected[3]
    assert get(load_config(None, env=env)) == expected[2]
    assert get(load_config(None, env={}, overrides={key: flag})) == expected[3]


def test_layers_resolve_independently_per_key(tmp_path):
    path = write(tmp_path, "server:\n  listen: '0.0.0.0:1'\n  data_dir: from-file\n  id: file-id\n")
    env = {"QM_SERVER__DATA_DIR": "from-env", "QM_SERVER__ID": "env-id"}
    cfg = load_config(path, env=env, overrides={"server.id": "flag-id"})
    assert cfg.server.listen == "0.0.0.0:1"  # file
    assert cfg.server.data_dir == "from-env"  # env
    assert cfg.server.id == "flag-id"  # flag
    assert cfg.server.grace_s == 5.0  # default


def test_override_none_means_flag_not_given():
    cfg = load_config(env={"QM_WORKER__PROCS": "4"}, overrides={"worker.procs": None, "server.listen": None})
    assert cfg.worker.procs == 4
    assert cfg.server.listen == "127.0.0.1:50051"


def test_env_none_reads_os_environ(monkeypatch):
    monkeypatch.setenv("QM_WORKER__PROCS", "7")
    monkeypatch.delenv("QM_CONFIG", raising=False)
    assert load_config().worker.procs == 7


def test_env_example_from_docs():
    cfg = load_config(env={"QM_SERVER__LISTEN": "0.0.0.0:6000", "QM_WORKER__PROCS": "4"})
    assert cfg.server.listen == "0.0.0.0:6000"
    assert cfg.worker.procs == 4


def test_non_qm_env_vars_ignored():
    assert load_config(env={"HOME": "/root", "QMX": "1", "PATH": "/bin"}) == Config()


def test_empty_env_value_sets_empty_string(tmp_path):
    path = write(tmp_path, "server:\n  id: from-file\n")
    assert load_config(path, env={"QM_SERVER__ID": ""}).server.id == ""


# ------------------------------------------------------------ QM_CONFIG ---


def test_qm_config_used_when_path_is_none(tmp_path):
    path = write(tmp_path, "worker:\n  procs: 5\n")
    assert load_config(None, env={"QM_CONFIG": str(path)}).worker.procs == 5


def test_explicit_path_beats_qm_config(tmp_path):
    named = write(tmp_path, "worker:\n  procs: 5\n", "named.yaml")
    given = write(tmp_path, "worker:\n  procs: 6\n", "given.yaml")
    assert load_config(given, env={"QM_CONFIG": str(named)}).worker.procs == 6


def test_empty_qm_config_means_no_file():
    assert load_config(None, env={"QM_CONFIG": ""}) == Config()


def test_qm_config_missing_file_names_the_variable(tmp_path):
    missing = tmp_path / "nope.yaml"
    err = config_error(env={"QM_CONFIG": str(missing)})
    assert err.path == str(missing)
    assert "not found" in str(err) and "QM_CONFIG" in str(err)


def test_env_layer_still_beats_qm_config_file(tmp_path):
    path = write(tmp_path, "worker:\n  procs: 5\n")
    cfg = load_config(env={"QM_CONFIG": str(path), "QM_WORKER__PROCS": "9"})
    assert cfg.worker.procs == 9


# ---------------------------------------------------------- file errors ---


def test_file_not_found(tmp_path):
    missing = tmp_path / "missing.yaml"
    err = config_error(path=missing)
    assert err.path == str(missing)
    assert "config file not found" in str(err)


def test_path_is_a_directory(tmp_path):
    err = config_error(path=tmp_path)
    assert err.path == str(tmp_path)
    assert "cannot read" in str(err)


def test_yaml_parse_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "server:\n  listen: '1.2.3.4:5'\n  data_dir: [unclosed\n")
    err = config_error(path=path)
    assert err.path == str(path)
    assert "invalid YAML" in str(err)
    assert "line " in str(err)


def test_yaml_parse_error_reports_the_right_line(tmp_path):
    path = write(tmp_path, "server:\n  listen: a\n bad: : :\n")
    err = config_error(path=path)
    assert "line 3" in err.reason


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    err = config_error(path=path)
    assert err.path == str(path)
    assert "top level must be a mapping" in err.reason and kind in err.reason


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), env={}) == Config()
    assert load_config(write(tmp_path, "# only comments\n", "c.yaml"), env={}) == Config()


def test_section_not_a_mapping(tmp_path):
    path = write(tmp_path, "server: 5\n")
    err = config_error(path=path)
    assert err.path == "server"
    assert "section must be a mapping" in err.reason and str(path) in err.reason


def test_empty_section_is_allowed(tmp_path):
    path = write(tmp_path, "server:\n  # listen: '0.0.0.0:1'\nworker:\n  procs: 2\n")
    cfg = load_config(path, env={})
    assert cfg.server == Config().server and cfg.worker.procs == 2


def test_unknown_section_in_file(tmp_path):
    path = write(tmp_path, "servr:\n  listen: 'a:1'\n")
    err = config_error(path=path)
    assert err.path == "servr"
    assert "unknown section" in err.reason and str(path) in err.reason
    assert "server" in err.reason  # lists the known sections


def test_unknown_key_in_file_lists_known_keys(tmp_path):
    path = write(tmp_path, "server:\n  lisen: 'a:1'\n")
    err = config_error(path=path)
    assert err.path == "server.lisen"
    assert "unknown key" in err.reason and str(path) in err.reason
    for known in ("listen", "data_dir", "id", "max_payload_bytes", "grace_s"):
        assert known in err.reason


# ----------------------------------------------------- env / flag errors ---


def test_unknown_section_in_env():
    err = config_error(env={"QM_SERVR__LISTEN": "a:1"})
    assert err.path == "servr"
    assert "QM_SERVR__LISTEN" in err.reason and "unknown section" in err.reason


def test_unknown_key_in_env_lists_known_keys():
    err = config_error(env={"QM_WORKER__PROC": "4"})
    assert err.path == "worker.proc"
    assert "QM_WORKER__PROC" in err.reason and "unknown key" in err.reason
    assert "procs" in err.reason and "start_method" in err.reason


@pytest.mark.parametrize("name", ["QM___LISTEN", "QM_SERVER__"])
def test_qm_env_var_of_the_settings_form_not_naming_a_setting(name):
    err = config_error(env={name: "x"})
    assert name in err.reason
    assert "QM_<SECTION>__<KEY>" in err.reason


@pytest.mark.parametrize("name", ["QM_SRC", "QM_LISTEN", "QM_HOME_DIR"])
def test_other_qm_env_vars_are_left_alone(name):
    """QM_SRC=... qm-server used to stop start-up: only QM_<SECTION>__<KEY> names are ours."""
    assert load_config(env={name: "/somewhere", "QM_WORKER__PROCS": "3"}).worker.procs == 3


def test_qm_config_is_not_treated_as_a_setting():
    assert load_config(env={"QM_CONFIG": ""}) == Config()


def test_unknown_key_in_flag():
    err = config_error(overrides={"server.nope": "x"})
    assert err.path == "server.nope"
    assert "command-line flag" in err.reason and "listen" in err.reason


def test_unknown_section_in_flag():
    err = config_error(overrides={"nope.listen": "x"})
    assert err.path == "nope"
    assert "command-line flag" in err.reason


def test_undotted_flag_key():
    err = config_error(overrides={"listen": "x"})
    assert err.path == "listen"
    assert "dotted" in err.reason


def test_bad_value_in_lower_layer_is_reported_even_if_overridden():
    err = config_error(env={"QM_WORKER__PROCS": "many"}, overrides={"worker.procs": 2})
    assert err.path == "worker.procs"


# --------------------------------------------------------- type errors ---


def test_wrong_type_message_matches_spec():
    err = config_error(env={"QM_WORKER__PROCS": "many"})
    assert err.path == "worker.procs"
    assert str(err) == "config worker.procs: expected an integer, got 'many' (from env QM_WORKER__PROCS)"


@pytest.mark.parametrize(
    "key, yaml_value, problem",
    [
        ("worker.procs", "4.5", "expected an integer"),
        ("worker.procs", "true", "expected an integer"),
        ("server.grace_s", "soon", "expected a number"),
        ("server.grace_s", ".inf", "expected a number"),
        ("server.data_dir", "123", "expected a string"),
        ("server.id", "null", "expected a string"),
        ("worker.queues", "{a: 1}", "expected a list"),
        ("worker.queues", "[1, 2]", "expected a list"),
    ],
)
def test_wrong_type_in_file(tmp_path, key, yaml_value, problem):
    section, name = key.split(".")
    path = write(tmp_path, f"{section}:\n  {name}: {yaml_value}\n")
    err = config_error(path=path)
    assert err.path == key
    assert problem in err.reason and f"file {path}" in err.reason


def test_wrong_type_in_flag():
    err = config_error(overrides={"server.grace_s": "later"})
    assert err.path == "server.grace_s"
    assert "expected a number" in err.reason and "command-line flag for server.grace_s" in err.reason


def test_typed_flags_accepted():
    cfg = load_config(env={}, overrides={"worker.procs": 3, "server.grace_s": 1, "worker.queues": ("a", "b")})
    assert cfg.worker.procs == 3
    assert cfg.server.grace_s == 1.0 and isinstance(cfg.server.grace_s, float)
    assert cfg.worker.queues == ["a", "b"]


def test_string_numbers_coerced():
    env = {"QM_BROKER__HEARTBEAT_S": " 0 ", "QM_SERVER__GRACE_S": "0", "QM_SERVER__MAX_PAYLOAD_BYTES": "10"}
    cfg = load_config(env=env)
    assert cfg.broker.heartbeat_s == 0
    assert cfg.server.grace_s == 0.0
    assert cfg.server.max_payload_bytes == 10


# -------------------------------------------------------- range errors ---


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("broker.heartbeat_s", "-1", ">= 0"),
        ("broker.heartbeat_s", "70000", "<= 65535"),
        ("broker.reconnect_max_delay_s", "0", "> 0"),
        ("server.max_payload_bytes", "0", "> 0"),
        ("server.grace_s", "-0.5", ">= 0"),
        ("worker.procs", "-1", ">= 0"),
        ("server.data_dir", " ", "must not be empty"),
        ("server.id", "a/b", "no '/', spaces"),
        ("server.id", "two words", "no '/', spaces"),
        ("server.id", "..", "not '.' or '..'"),
        ("server.id", "x" * 201, "1 to 200 bytes"),
    ],
)
def test_out_of_range(key, value, problem):
    section, name = key.split(".")
    var = env_var_name(section, name)
    err = config_error(env={var: value})
    assert err.path == key
    assert problem in err.reason and var in err.reason


# --------------------------------------------------------- enum errors ---


@pytest.mark.parametrize(
    "key, value, choices",
    [
        ("broker.queue_type", "stream", "classic, quorum"),
        ("worker.start_method", "fork", "forkserver, spawn"),
        ("log.level", "verbose", "DEBUG, INFO, WARNING, ERROR"),
    ],
)
def test_bad_enum(key, value, choices):
    err = config_error(overrides={key: value})
    assert err.path == key
    assert f"must be one of {choices}" in err.reason and repr(value) in err.reason
    assert "command-line flag" in err.reason


def test_log_level_case_insensitive_stored_upper():
    assert load_config(env={"QM_LOG__LEVEL": "warning"}).log.level == "WARNING"
    assert load_config(env={}, overrides={"log.level": "Debug"}).log.level == "DEBUG"


# ------------------------------------------------------------- prefetch ---


@pytest.mark.parametrize(
    "raw, stored", [("auto", "auto"), ("AUTO", "auto"), ("8", 8), (8, 8), (" 16 ", 16), ("08", 8)]
)
def test_prefetch_accepted(raw, stored):
    assert load_config(env={}, overrides={"worker.prefetch": raw}).worker.prefetch == stored


def test_prefetch_int_from_yaml_stored_as_int(tmp_path):
    path = write(tmp_path, "worker:\n  prefetch: 32\n")
    assert load_config(path, env={}).worker.prefetch == 32


@pytest.mark.parametrize("raw", ["0", "-3", "many", "1.5", True, 0])
def test_prefetch_rejected(raw):
    err = config_error(overrides={"worker.prefetch": raw})
    assert err.path == "worker.prefetch"
    assert "expected 'auto' or a positive integer" in err.reason


# ---------------------------------------------------------------- lists ---


def test_queue_list_from_env_is_comma_separated():
    cfg = load_config(env={"QM_WORKER__QUEUES": " a, b ,,c.d-e_f , "})
    assert cfg.worker.queues == ["a", "b", "c.d-e_f"]


def test_queue_list_from_yaml_list_and_string(tmp_path):
    assert load_config(write(tmp_path, "worker:\n  queues: [x, ' y ']\n"), env={}).worker.queues == ["x", "y"]
    as_string = write(tmp_path, "worker:\n  queues: 'p,q'\n", "s.yaml")
    assert load_config(as_string, env={}).worker.queues == ["p", "q"]


@pytest.mark.parametrize("value", ["", " , ,"])
def test_queue_list_must_not_be_empty(value):
    err = config_error(env={"QM_WORKER__QUEUES": value})
    assert err.path == "worker.queues"
    assert "at least one queue" in err.reason and "QM_WORKER__QUEUES" in err.reason


def test_queue_name_charset():
    err = config_error(env={"QM_WORKER__QUEUES": "good,bad name"})
    assert err.path == "worker.queues"
    assert "'bad name'" in err.reason and "letters, digits" in err.reason


def test_queue_duplicates_rejected():
    err = config_error(env={"QM_WORKER__QUEUES": "a,b,a"})
    assert err.path == "worker.queues" and "more than once" in err.reason


# ------------------------------------------------------------ host:port ---


def test_listen_port_zero_accepted():
    assert load_config(env={"QM_SERVER__LISTEN": "127.0.0.1:0"}).server.listen == "127.0.0.1:0"


def test_ipv6_listen_accepted():
    cfg = load_config(env={"QM_SERVER__LISTEN": "[::1]:50051", "QM_CLIENT__SERVER": "[::1]:50051"})
    assert cfg.server.listen == "[::1]:50051"
    assert parse_host_port(cfg.client.server) == ("::1", 50051)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("[::1]:50051", ("::1", 50051)),
        ("[::]:0", ("::", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("0.0.0.0:6000", ("0.0.0.0", 6000)),
        (" my-host.example_1:80 ", ("my-host.example_1", 80)),
    ],
)
def test_parse_host_port_valid(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "localhost", "localhost:", ":50051", "host:65536", "host:-1", "host:port", "::1:50051",
        "[::1]", "[nope]:1", "a b:1", "grpc://host:1", "", "[::1]:+5",
    ],
)
def test_parse_host_port_invalid(text):
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_unbracketed_ipv6_hint():
    with pytest.raises(ValueError, match=r"brackets"):
        parse_host_port("::1:50051")


@pytest.mark.parametrize("key", ["server.listen", "client.server"])
def test_bad_host_port_in_config(tmp_path, key):
    section, name = key.split(".")
    path = write(tmp_path, f"{section}:\n  {name}: 'localhost'\n")
    err = config_error(path=path)
    assert err.path == key
    assert "HOST:PORT" in err.reason and "'localhost'" in err.reason and str(path) in err.reason


def test_client_port_zero_rejected():
    err = config_error(env={"QM_CLIENT__SERVER": "127.0.0.1:0"})
    assert err.path == "client.server"
    assert "port 0" in err.reason and "QM_CLIENT__SERVER" in err.reason


# ----------------------------------------------------------- broker url ---


@pytest.mark.parametrize("url", ["amqp://h", "amqps://u:p@h:5671/vh", "AMQP://g:g@127.0.0.1:5672/%2F"])
def test_broker_url_accepted(url):
    assert load_config(env={"QM_BROKER__URL": url}).broker.url == url


@pytest.mark.parametrize("url", ["http://h:5672/", "127.0.0.1:5672", "amqp://", "amqp:/h", ""])
def test_broker_url_rejected(url):
    err = config_error(env={"QM_BROKER__URL": url})
    assert err.path == "broker.url"
    assert "amqp:// or amqps://" in err.reason and "QM_BROKER__URL" in err.reason


def test_broker_url_error_hides_password():
    err = config_error(env={"QM_BROKER__URL": "http://user:s3cret@host/"})
    assert "s3cret" not in str(err) and "user:***@host" in str(err)


# -------------------------------------------------------------- to_dict ---


def test_to_dict_is_plain_and_redacts_password():
    cfg = load_config(env={"QM_BROKER__URL": "amqp://bob:s3cret@mq:5672/v", "QM_WORKER__QUEUES": "a,b"})
    shown = cfg.to_dict()
    assert shown["broker"]["url"] == "amqp://bob:***@mq:5672/v"
    assert shown["worker"]["queues"] == ["a", "b"]
    assert set(shown) == {"broker", "server", "worker", "client", "executor", "log"}
    assert cfg.to_dict(redact=False)["broker"]["url"] == "amqp://bob:s3cret@mq:5672/v"
    shown["worker"]["queues"].append("c")
    assert cfg.worker.queues == ["a", "b"]


# ------------------------------------------------- shipped config.yaml ---


def all_keys() -> list[tuple[str, str]]:
    return [(s.name, f.name) for s in dataclasses.fields(Config) for f in dataclasses.fields(s.type)]


def test_shipped_config_yaml_yields_defaults():
    assert load_config(SHIPPED, env={}) == Config()


def test_shipped_config_yaml_documents_every_key():
    import yaml

    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    documented = [(section, key) for section, body in data.items() for key in body]
    assert sorted(documented) == sorted(all_keys())


def test_shipped_config_yaml_comment_above_every_key():
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    for section, key in all_keys():
        start = lines.index(f"{section}:")
        index = next(i for i in range(start, len(lines)) if lines[i].startswith(f"  {key}:"))
        comment = lines[index - 1].strip()
        assert comment.startswith("#"), f"{section}.{key} lacks a comment line"
        assert env_var_name(section, key) in comment, f"{section}.{key} comment lacks its env var"


def test_shipped_config_yaml_header_explains_precedence():
    header = SHIPPED.read_text(encoding="utf-8").split("\n\n")[0]
    assert "QM_CONFIG" in header and "flag" in header and "default" in header


def test_the_client_may_name_several_servers():
    cfg = load_config(env={"QM_CLIENT__SERVER": "10.0.0.1:50051, [::1]:6000"})
    assert cfg.client.server == "10.0.0.1:50051,[::1]:6000"
    err = config_error(env={"QM_CLIENT__SERVER": "10.0.0.1:50051,nope"})
    assert err.path == "client.server" and "'nope'" in err.reason
    err = config_error(env={"QM_CLIENT__SERVER": "10.0.0.1:50051,"})
    assert err.path == "client.server" and "several separated by commas" in err.reason


# ------------------------------------------------- deprecated keys ---


def test_deprecated_soft_timeout_grace_is_accepted_ignored_and_warned_about(caplog, tmp_path):
    """A configuration that set it still starts (rolling upgrades), but the soft timeout is
    no longer derived from the time limit; the warning says where it was set."""
    cfg_file = tmp_path / "qm.yaml"
    cfg_file.write_text("worker:\n  soft_timeout_grace_s: 2.0\n")
    with caplog.at_level("WARNING", logger="qm.config"):
        cfg = load_config(cfg_file, env={"QM_WORKER__SOFT_TIMEOUT_GRACE_S": "0"})
    assert not hasattr(cfg.worker, "soft_timeout_grace_s")
    assert "soft_timeout_grace_s" not in cfg.to_dict()["worker"]
    warned = [r.getMessage() for r in caplog.records if "worker.soft_timeout_grace_s" in r.getMessage()]
    assert len(warned) == 2 and "ignored" in warned[0]
    assert any("env QM_WORKER__SOFT_TIMEOUT_GRACE_S" in m for m in warned)


def test_deprecated_key_with_a_bad_value_still_names_it():
    err = config_error(env={"QM_WORKER__SOFT_TIMEOUT_GRACE_S": "soon"})
    assert err.path == "worker.soft_timeout_grace_s"
    assert "expected a number" in err.reason and "ignored" in err.reason
