"""Plugins: find → load → validate, with fake entry points over modules in tmp_path."""
from __future__ import annotations

import importlib.metadata
import itertools
import json
import textwrap

import pytest

from qm import registry
from qm.errors import PluginError, UnknownTaskType, ValidationError
from qm.registry import Registry, TaskType

_module_numbers = itertools.count()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """plugin(source, attr, name) → an EntryPoint for `attr` of a fresh module with `source`."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(source: str, attr: str, name: str) -> importlib.metadata.EntryPoint:
        module = f"qm_fake_plugin_{next(_module_numbers)}_{tmp_path.name.replace('-', '_')}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return importlib.metadata.EntryPoint(name=name, value=f"{module}:{attr}", group=registry.ENTRY_POINT_GROUP)

    return make


FUNCTION = '''
def shout(payload):
    """Upper-case the payload.

    More text that is not the description.
    """
    return payload.upper()
'''


def test_plain_function_becomes_a_text_task_type(plugin):
    [loaded] = registry.load([plugin(FUNCTION, "shout", "shout")])
    assert isinstance(loaded, TaskType)
    assert (loaded.name, loaded.codec, loaded.description) == ("shout", "text", "Upper-case the payload.")
    assert loaded.encode_result(loaded.handler(loaded.decode_payload(b"hi"))) == b"HI"


def test_function_without_docstring_has_empty_description(plugin):
    [loaded] = registry.load([plugin("def f(p):\n    return 7\n", "f", "seven")])
    assert loaded.description == ""
    assert loaded.encode_result(loaded.handler("x")) == b"7"  # non-str results are str()-ed


TASK_TYPE_OBJECT = '''
from qm.registry import TaskType

def double(numbers):
    return [n * 2 for n in numbers]

TASK = TaskType(name="double", handler=double, codec="json", description="Doubles numbers")
'''


def test_task_type_object_is_used_as_is(plugin):
    ep = plugin(TASK_TYPE_OBJECT, "TASK", "double")
    [loaded] = registry.load([ep])
    # As declared; only the distribution it came from is recorded (a fake entry point has none).
    assert loaded == ep.load() and loaded.handler is ep.load().handler
    assert loaded.distribution == "unknown distribution"
    assert (loaded.codec, loaded.description) == ("json", "Doubles numbers")
    assert loaded.encode_result(loaded.handler(loaded.decode_payload(b"[1, 2]"))) == b"[2, 4]"


def test_task_type_object_takes_the_entry_point_name(plugin):
    [loaded] = registry.load([plugin(TASK_TYPE_OBJECT, "TASK", "twice")])
    assert loaded.name == "twice" and loaded.codec == "json"


def test_import_error_becomes_plugin_error_and_others_still_load(plugin):
    broken = plugin("import qm_no_such_dependency_anywhere\n", "f", "broken")
    good = plugin(FUNCTION, "shout", "shout")
    raising = plugin("raise RuntimeError('bad import-time code')\n", "f", "raising")
    loaded = registry.load([broken, good, raising])
    assert isinstance(loaded[0], PluginError) and isinstance(loaded[2], PluginError)
    assert "'broken'" in str(loaded[0]) and "ModuleNotFoundError" in str(loaded[0])
    assert isinstance(loaded[0].__cause__, ModuleNotFoundError)
    assert "'raising'" in str(loaded[2]) and "bad import-time code" in str(loaded[2])
    assert isinstance(loaded[2].__cause__, RuntimeError)
    served = registry.validate(loaded)
    assert list(served.types) == ["shout"]
    assert served.errors == (loaded[0], loaded[2])


def test_missing_attribute_is_a_plugin_error(plugin):
    [error] = registry.load([plugin(FUNCTION, "no_such_function", "shout")])
    assert isinstance(error, PluginError)
    assert "'shout'" in str(error) and isinstance(error.__cause__, AttributeError)


def test_non_callable_target_is_a_plugin_error(plugin):
    [error] = registry.load([plugin("VALUE = 42\n", "VALUE", "number")])
    assert isinstance(error, PluginError)
    assert "'number'" in str(error) and "int" in str(error)


def _handler(payload):
    return payload


def test_duplicate_names_report_an_error_and_the_first_wins():
    first = TaskType("dup", _handler, description="first")
    second = TaskType("dup", _handler, description="second")
    served = registry.validate([first, second])
    assert served.types == {"dup": first}
    [error] = served.errors
    assert isinstance(error, PluginError) and "'dup'" in str(error) and "twice" in str(error)


@pytest.mark.parametrize("name", ["", "1starts-with-digit", "has space", "semi;colon", "x" * 65, "ünïcode"])
def test_bad_names_are_rejected(name):
    served = registry.validate([TaskType(name, _handler), TaskType("fine", _handler)])
    assert list(served.types) == ["fine"]
    [error] = served.errors
    assert "invalid" in str(error) and repr(name) in str(error)


@pytest.mark.parametrize("name", ["a", "math", "test.echo", "my_task-2", "x" * 64])
def test_good_names_are_accepted(name):
    assert list(registry.validate([TaskType(name, _handler)]).types) == [name]


def test_bad_codec_is_rejected():
    served = registry.validate([TaskType("pickled", _handler, codec="pickle")])
    assert served.types == {}
    [error] = served.errors
    assert "'pickle'" in str(error) and "text, json, bytes" in str(error)


def test_find_lists_entry_points_sorted_without_importing():
    found = registry.find()
    names = [ep.name for ep in found]
    assert names == sorted(names)
    assert "math" in names
    assert registry.find("qm.no-such-group") == []


def test_get_unknown_type_lists_the_known_ones():
    served = Registry({"b": TaskType("b", _handler), "a": TaskType("a", _handler)})
    with pytest.raises(UnknownTaskType) as info:
        served.get("nope")
    assert info.value.field == "type"
    assert "'nope'" in str(info.value) and "known: a, b" in str(info.value)
    assert isinstance(info.value, ValidationError)
    with pytest.raises(UnknownTaskType, match="none installed"):
        Registry({}).get("nope")


def test_installed_registry_serves_math():
    served = registry.discover()
    assert served.errors == ()
    math = served.get("math")
    assert math.codec == "text"
    assert math.encode_result(math.handler(math.decode_payload(b"1 + 2 * 5"))) == b"11"
    with pytest.raises(ValidationError) as info:
        math.check_payload(b"1 +")
    assert info.value.field == "payload"
    math.check_payload(b"1 + 2 * 5")


def test_json_codec():
    task_type = TaskType("j", _handler, codec="json")
    assert task_type.decode_payload(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    assert json.loads(task_type.encode_result({"a": [1, "x"]})) == {"a": [1, "x"]}
    with pytest.raises(ValidationError) as info:
        task_type.decode_payload(b"{not json")
    assert info.value.field == "payload" and "json" in str(info.value) and "'j'" in str(info.value)


def test_bytes_codec_passes_through():
    task_type = TaskType("b", _handler, codec="bytes")
    raw = bytes(range(256))
    assert task_type.decode_payload(raw) == raw
    assert task_type.encode_result(bytearray(b"\x00\xff")) == b"\x00\xff"
    task_type.check_payload(b"\xff\xfe")  # no decoding, no validator: anything goes


def test_text_codec_rejects_invalid_utf8():
    task_type = TaskType("t", _handler)
    assert task_type.decode_payload("héllo".encode()) == "héllo"
    assert task_type.encode_result(3.5) == b"3.5"
    with pytest.raises(ValidationError) as info:
        task_type.check_payload(b"\xff\xfe")
    assert info.value.field == "payload" and str(info.value).startswith("payload:")
    assert "text" in str(info.value)


def test_check_payload_runs_the_plugin_validator_on_the_decoded_payload():
    seen = []

    def validator(decoded):
        seen.append(decoded)
        if decoded["n"] < 0:
            raise ValidationError("payload", "n must be >= 0")

    task_type = TaskType("v", _handler, codec="json", validate=validator)
    task_type.check_payload(b'{"n": 1}')
    with pytest.raises(ValidationError, match="n must be >= 0"):
        task_type.check_payload(b'{"n": -1}')
    assert seen == [{"n": 1}, {"n": -1}]


def _installed_builtin(name: str) -> TaskType:
    [ep] = [ep for ep in registry.find() if ep.name == name]
    [loaded] = registry.load([ep])
    assert isinstance(loaded, TaskType)
    return loaded


@pytest.mark.parametrize("name", ["math", "python"])
@pytest.mark.parametrize("plugin_first", [True, False])
def test_a_plugin_cannot_replace_a_built_in_type(name, plugin_first):
    """A plugin distribution registering `math` or `python` is a load error naming both
    distributions, whichever entry point comes first; the built-in is served."""
    builtin = _installed_builtin(name)
    impostor = TaskType(name, _handler, description="impostor", distribution="evil-plugin")
    served = registry.validate([impostor, builtin] if plugin_first else [builtin, impostor])
    assert served.types[name] is builtin and builtin.distribution == "queuemaster"
    [error] = served.errors
    assert "evil-plugin" in str(error) and "queuemaster" in str(error) and f"built-in task type {name!r}" in str(error)
