"""broker.urls: the nodes of a RabbitMQ cluster, from a YAML list, a comma-separated env
variable or --broker-url; broker.url stays the one-node form."""
from __future__ import annotations

import asyncio

import pytest

from qm.config import load_config
from qm.errors import ConfigError
from qm.server.app import parse_args as server_args
from qm.worker.app import parse_args as worker_args

A = "amqp://guest:secret@10.0.0.1:5672/%2F"
B = "amqp://guest:secret@10.0.0.2:5672/%2F"


def test_without_urls_the_one_url_is_the_only_node():
    config = load_config(env={"QM_BROKER__URL": A})
    assert config.broker.urls == [] and config.broker.node_urls == [A]


def test_urls_from_env_are_comma_separated_and_win_over_url(tmp_path):
    path = tmp_path / "qm.yaml"
    path.write_text(f"broker:\n  url: '{A}'\n")
    config = load_config(path, env={"QM_BROKER__URLS": f"{A}, {B}"})
    assert config.broker.node_urls == [A, B]


def test_urls_from_a_yaml_list(tmp_path):
    path = tmp_path / "qm.yaml"
    path.write_text(f"broker:\n  urls:\n    - '{B}'\n    - '{A}'\n")
    assert load_config(path, env={}).broker.node_urls == [B, A]


@pytest.mark.parametrize("parse", [server_args, worker_args])
def test_broker_url_flag_takes_a_list(parse):
    args = parse(["--broker-url", f"{A},{B}"])
    config = load_config(env={}, overrides={"broker.urls": args.broker_url})
    assert config.broker.node_urls == [A, B]


def test_a_bad_url_in_the_list_names_the_key_and_hides_the_password():
    with pytest.raises(ConfigError) as err:
        load_config(env={"QM_BROKER__URLS": f"{A},http://guest:secret@host/"})
    assert err.value.path == "broker.urls" and "amqp://" in str(err.value)
    assert "secret" not in str(err.value)


def test_shown_config_masks_every_password():
    shown = load_config(env={"QM_BROKER__URLS": f"{A},{B}"}).to_dict()
    assert shown["broker"]["urls"] == [url.replace("secret", "***") for url in (A, B)]


def test_cluster_settings_are_checked():
    config = load_config(env={"QM_BROKER__QUORUM_INITIAL_GROUP_SIZE": "3", "QM_BROKER__SERVER_QUEUE_TYPE": "quorum"})
    assert (config.broker.quorum_initial_group_size, config.broker.server_queue_type) == (3, "quorum")
    with pytest.raises(ConfigError) as err:
        load_config(env={"QM_BROKER__SERVER_QUEUE_TYPE": "stream"})
    assert err.value.path == "broker.server_queue_type"


@pytest.mark.parametrize(("server_queue_type", "warned"), [("classic", True), ("quorum", False)])
def test_a_server_on_several_nodes_with_classic_server_queues_says_what_to_set(tmp_path, caplog,
                                                                               server_queue_type, warned):
    from qm.registry import discover
    from qm.server.app import ServerApp

    config = load_config(env={"QM_BROKER__URLS": f"{A},{B}", "QM_SERVER__DATA_DIR": str(tmp_path),
                              "QM_BROKER__SERVER_QUEUE_TYPE": server_queue_type})

    async def body():  # grpc.aio builds its server on the running loop; nothing connects before start()
        app = ServerApp(config, discover())
        await app.store.close()
        app.identity.release()

    asyncio.run(body())
    said = [r.getMessage() for r in caplog.records if "broker.server_queue_type" in r.getMessage()]
    assert bool(said) is warned and all("set broker.server_queue_type: quorum" in line for line in said)
