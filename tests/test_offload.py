"""Activation offload: saved tensors leave for host memory in forward and return, one module ahead,
in backward. CPU is a host-only device (its copies are free no-ops), so the mechanism is exercised
with recording stand-ins for ``devices.copy_to_host``/``copy_to_device`` whose copies are real,
separate tensors. (The transfer code itself, streams and events included, is tested in
tests/test_transfers.py, also under this offload.)"""
import functools

import pytest
import torch

import devices
from devices import Transfer
from paca_core import LoRAConfig, prepare_model
from paca_core.memory.offload import offload_activations

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
    model = prepare_model(tiny_llama(seed=0, num_hidden_layers=4), LoRAConfig(r=4), device="cpu")
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
    marks = [events.index(f"backward {i}") for i in range(last, -1, -1)]
    # Each layer's backward fetches the previous layer's tensors ahead of it: between the start of one
    # layer's backward and the next there are copies (the last layer also fetches its own), and once the
    # first layer's backward starts everything is back.
    for start, end in zip(marks, marks[1:]):
        assert events[start:end].count("copy") > 0, events[start:end]
    assert events[:marks[0]].count("copy") == 0 and events[marks[-1]:].count("copy") == 0


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
    from paca_core.cli.dispatch import main

    flags = [
        "train", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--steps", "2", "--seq-len", "16",
        "--batch-size", "2", "--sample-tokens", "0", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run"),
        "--offload-activations", "decoder-layers",
    ]
    with caplog.at_level("INFO"):
        assert main(flags) == 0
    assert "Offloading saved activations of 2 modules" in caplog.text


# --- composed with gradient checkpointing ------------------------------------------------------------
def _layer_inputs_shape(model, ids):
    return (ids.shape[0], ids.shape[1], model.base_model.config.hidden_size)


def test_checkpointed_layers_send_only_their_inputs_to_host_and_stay_exact(monkeypatch):
    """Offload + HF gradient checkpointing: each decoder layer keeps only its input for the recompute, and that
    input goes to host and comes back (one layer ahead) when backward recomputes the layer; gradients are
    bit-identical to the plain step."""
    from paca_core import PaCAConfig

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4, seed=0), device="cpu")
    reference_loss, reference_grads = _loss_and_grads(model, ids)

    model.gradient_checkpointing_enable()
    handle = offload_activations(model.base_model, "decoder-layers", min_bytes=1)
    transfers = CopyingTransfers(monkeypatch)
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=0, msg=name)
    layers = len(model.base_model.model.layers)
    to_host = [shape for kind, shape in transfers.log if kind == "to_host"]
    # Only the layer inputs left (the recompute makes the rest), each once, and each came back once.
    assert to_host == [_layer_inputs_shape(model, ids)] * layers
    assert [e for e in transfers.log if e[0] == "to_device"] == [("to_device", s) for s in to_host]
    assert handle.stats.offloaded_bytes == handle.stats.reloaded_bytes > 0
    handle.remove()


def test_offload_installed_before_checkpointing_is_enabled_still_composes(monkeypatch):
    """gradient_checkpointing_enable() after the offload: the next forward routes the new checkpoint through
    the layer's group (no inner hooks of ours take the checkpoint's saves)."""
    from paca_core import PaCAConfig

    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4, seed=0), device="cpu")
    handle = offload_activations(model.base_model, "decoder-layers", min_bytes=1)
    model.gradient_checkpointing_enable()
    transfers = CopyingTransfers(monkeypatch)
    model(input_ids=ids, labels=ids).loss.backward()
    layers = len(model.base_model.model.layers)
    assert [s for k, s in transfers.log if k == "to_host"] == [_layer_inputs_shape(model, ids)] * layers
    handle.remove()
    assert not any(type(m._gradient_checkpointing_func).__name__ == "_CheckpointInGroup"
                   for m in model.base_model.model.layers)


class _CallCheckpointedLayer(torch.nn.Module):
    """A layer checkpointed the way transformers 4.x does it: around ``__call__``, so module hooks run inside."""

    gradient_checkpointing = False

    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
        return super().__call__(*args, **kwargs)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_checkpoint_around_call_as_in_transformers_4(monkeypatch):
    """Where the checkpoint wraps ``__call__`` (transformers 4.55), our module hooks fire inside it; they must
    leave its saves alone (or the checkpointing is undone) and its inputs must still go to host."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    width = 8
    stack = torch.nn.Sequential(*[_CallCheckpointedLayer(width) for _ in range(3)])
    x = torch.randn(2, 5, width, requires_grad=True)
    stack(x).square().sum().backward()
    reference = [p.grad.clone() for p in stack.parameters()] + [x.grad.clone()]
    stack.zero_grad(set_to_none=True)
    x.grad = None

    for layer in stack:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    handle = offload_activations(stack, r"\d+", min_bytes=1)
    transfers = CopyingTransfers(monkeypatch)
    stack(x).square().sum().backward()
    for got, want in zip([p.grad for p in stack.parameters()] + [x.grad], reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [s for k, s in transfers.log if k == "to_host"] == [(2, 5, width)] * 3  # the inputs only
    assert handle.stats.kept_tensors == 0
    handle.remove()


def test_a_tensor_saved_by_several_nodes_moves_once(monkeypatch):
    """q, k and v (and views of one input) keep the same data: it leaves once and comes back once."""
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(3))
    model = prepare_model(tiny_llama(seed=0), LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]), device="cpu")
    handle = offload_activations(model.base_model, "decoder-layers", min_bytes=1)
    transfers = CopyingTransfers(monkeypatch)
    model(input_ids=ids, labels=ids).loss.backward()
    assert handle.stats.shared_tensors > 0
    assert len([e for e in transfers.log if e[0] == "to_host"]) == handle.stats.offloaded_tensors
    handle.remove()
