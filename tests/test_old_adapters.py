"""Adapters written before the method registry (tests/fixtures/adapters_before_method_registry, made
with paca-hal at commit dcc5424) still load, to the same logits. The checkpoint format does not change."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paca_core import PacaModel

from .conftest import tiny_llama

FIXTURES = Path(__file__).parent / "fixtures" / "adapters_before_method_registry"
CASES = ["paca", "lora_velora", "lorafa", "paca_full", "meft"]


@pytest.mark.parametrize("name", CASES)
def test_adapter_written_before_the_registry_loads_to_the_same_logits(name):
    expected = load_file(str(FIXTURES / "expected_logits.safetensors"))
    model = PacaModel.from_pretrained(tiny_llama(seed=0), FIXTURES / name)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected[name], rtol=0, atol=1e-6)
