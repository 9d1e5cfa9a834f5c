"""``--methods`` of paca plan / paca bench: near misses get the entry the user meant."""
import pytest

from paca_core.errors import PacaConfigError
from paca_core.workloads.specs import parse_method_list


@pytest.mark.parametrize("typed, meant", [("qlora", "'peft-qlora'"), ("peft_lora", "'peft-lora'"), ("lora-fa", "'lorafa'"), ("QPACA", None)])
def test_a_near_miss_names_the_entry(typed, meant):
    if meant is None:  # case does not matter: a valid entry
        assert [s.name for s in parse_method_list(typed)] == ["qpaca"]
        return
    with pytest.raises(PacaConfigError) as error:
        parse_method_list(typed)
    message = str(error.value)
    assert f"Did you mean {meant}" in message and "\n" not in message


def test_nothing_close_suggests_nothing():
    with pytest.raises(PacaConfigError) as error:
        parse_method_list("xyz")
    assert "Did you mean" not in str(error.value) and "peft-qlora" in str(error.value)
