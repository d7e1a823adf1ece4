"""The shared registry helper: registration order, duplicate refusal, one-line unknown-name errors."""
import pytest

from vislens.errors import VislensError
from vislens.registry import Registry


def test_registry_keeps_order_and_looks_up():
    reg: Registry[int] = Registry("widget")
    reg.add("b", 2)

    @reg.register("a")
    def a():
        return 1

    assert reg.names() == ("b", "a")
    assert reg.get("b") == 2 and reg.get("a") is a
    assert "a" in reg and "c" not in reg and len(reg) == 2
    assert list(reg) == ["b", "a"]


def test_registry_refuses_duplicates_and_names_valid_entries():
    reg: Registry[int] = Registry("widget")
    reg.add("x", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("x", 2)
    with pytest.raises(VislensError) as err:
        reg.get("y")
    msg = str(err.value)
    assert "\n" not in msg and "unknown widget 'y'" in msg and "x" in msg
