"""Activation offload: saved tensors leave for host memory in forward and return, one module ahead,
in backward. CPU is a host-only device (its copies are free no-ops), so the mechanism is exercised
with recording stand-ins for ``devices.copy_to_host``/``copy_to_device`` whose copies are real,
separate tensors. (The transfer code itself, streams and events included, is tested in
tests/test_transfers.py, also under this offload.)"""
import pytest
import torch

import devices
from devices import Transfer
from paca_core import LoRAConfig, prepare_model
from paca_core.offload import offload_activations

from .conftest import tiny_llama


class CopyingTransfers:
    """Stand-in for a device with its own memory: copies are real clones, and every one is logged."""

    def __init__(self, monkeypatch):
        self.log = []
        monkeypatch.setattr(devices, "copy_to_host", self.copy_to_host)
        monkeypatch.setattr(devices, "copy_to_device", self.copy_to_device)

    def copy_to_host(self, tensor, out=None):
        self.log.append(("to_host", tuple(tensor.shape)))
        return Transfer(tensor.detach().clone(), nbytes=tensor.numel() * tensor.element_size())

    def copy_to_device(self, host, device):
        self.log.append(("to_device", tuple(host.shape)))
        return Transfer(host.clone(), nbytes=host.numel() * host.element_size())


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_training_step_matches_and_moves_what_autograd_saves(monkeypatch):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model = prepare_model(tiny_llama(seed=0), LoRAConfig(r=4), device="cpu")
    reference_loss, reference_grads = _loss_and_grads(model, ids)

    handle = offload_activations(model, "decoder-layers", min_bytes=1)
    transfers = CopyingTransfers(monkeypatch)
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=0, msg=name)
    stats = handle.stats
    assert stats.offloaded_tensors > 0 and stats.offloaded_bytes == stats.reloaded_bytes
    to_host = [e for e in transfers.log if e[0] == "to_host"]
    to_device = [e for e in transfers.log if e[0] == "to_device"]
    assert len(to_host) == len(to_device) == stats.offloaded_tensors  # each saved tensor left once and came back once
    handle.remove()
    transfers.log.clear()
    _loss_and_grads(model, ids)
    assert transfers.log == []


def test_backward_prefetches_the_previous_layer_before_it_is_needed(monkeypatch):
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    model = prepare_model(tiny_llama(seed=0), LoRAConfig(r=4), device="cpu")
    handle = offload_activations(model, "decoder-layers", min_bytes=1)
    events = []

    class Recording(CopyingTransfers):
        def copy_to_device(self, host, device):
            events.append("copy")
            return super().copy_to_device(host, device)

    Recording(monkeypatch)
    layers = model.base_model.model.layers
    for i, layer in enumerate(layers):
        layer.register_full_backward_pre_hook(lambda module, grad, i=i: events.append(f"backward {i}"))
    model(input_ids=ids, labels=ids).loss.backward()
    last = len(layers) - 1
    per_layer = events.count("copy") // len(layers)
    assert per_layer > 0 and events.count("copy") == per_layer * len(layers)
    # by the time the second-to-last layer's backward starts, its tensors are already on their way back
    second_backward = events.index(f"backward {last - 1}")
    assert events[:second_backward].count("copy") == 2 * per_layer


def test_cpu_offload_is_a_pass_through_with_a_warning(caplog):
    model = prepare_model(tiny_llama(seed=0), LoRAConfig(r=4), device="cpu")
    with caplog.at_level("WARNING"):
        handle = offload_activations(model)
    assert "moves nothing" in caplog.text
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert handle.stats.offloaded_tensors == 0 and handle.stats.kept_tensors > 0


def test_no_match_is_a_clear_error():
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="matched no module"):
        offload_activations(model, ["nope"])


def test_cli_flag_installs_offload(tmp_path, tiny_model_dir, sample_text_file, caplog):
    from paca_core.cli import main

    flags = [
        "train", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--steps", "2", "--seq-len", "16",
        "--batch-size", "2", "--sample-tokens", "0", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run"),
        "--offload-activations", "decoder-layers",
    ]
    with caplog.at_level("INFO"):
        assert main(flags) == 0
    assert "Offloading saved activations of 2 modules" in caplog.text
