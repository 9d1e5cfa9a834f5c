"""The two plug-ins docs/ARCHITECTURE.md prints (a method, a device) work as printed: each is installed from the page
as a distribution with an entry point and run in a fresh process that never imports it by name."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from .plugin_dist import write_distribution

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"


def _plugin(kind: str) -> str:
    """The python block after ``<!-- plugin: KIND -->`` on the page."""
    match = re.search(rf"<!-- plugin: {kind} -->\n```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert match, f"docs/ARCHITECTURE.md has no '<!-- plugin: {kind} -->' python block"
    return match.group(1)


def _run(folder: Path, script: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_method_on_the_page_trains_saves_reloads_and_merges(tmp_path):
    write_distribution(tmp_path, "my-methods", {"paca_hal.methods": {"rowscale": "my_methods.rowscale:METHOD"}},
                       {"my_methods/__init__.py": "", "my_methods/rowscale.py": _plugin("method")})
    out = _run(tmp_path, f"""
        import torch
        from paca_core import PacaModel, prepare_model
        from paca_core.methods import find_method
        from tests.conftest import tiny_llama

        method = find_method("rowscale")  # through the entry point: nothing here imports my_methods
        model = prepare_model(tiny_llama(seed=0), method.config(target_modules=["q_proj", "down_proj"]))
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            with model.disable_adapter():
                assert not torch.allclose(model(input_ids=ids).logits, logits)  # it trained
        model.save_pretrained({str(tmp_path / "adapter")!r})
        loaded = PacaModel.from_pretrained(tiny_llama(seed=0), {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, logits)
            torch.testing.assert_close(loaded.merge_and_unload()(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        print("method ok", loaded.method)
    """)
    assert "method ok rowscale" in out


def test_the_device_on_the_page_is_offered_planned_for_and_refused_without_its_hardware(tmp_path):
    write_distribution(tmp_path, "my-devices", {"paca_hal.devices": {"xpu": "my_devices.xpu:XPURuntime"}},
                       {"my_devices/__init__.py": "", "my_devices/xpu.py": _plugin("device")})
    out = _run(tmp_path, """
        import torch
        import backends
        import devices

        assert "xpu" in devices.device_choices() and "xpu:N" in devices.device_choices()
        order = devices.auto_order()
        assert order.index("xpu") < order.index("cpu")
        assert {"eager", "compile"} <= set(devices.graph_mode_choices())
        assert type(backends.get_backend(torch.device("xpu"))).__name__ == "TorchBackend"  # the portable kernels
        runtime = devices.runtime_for("xpu")
        if runtime.is_available():
            device = devices.resolve_device("xpu")
            x = torch.ones(4, device=device)
            print("device ok", devices.memory_stats(device).source)
        else:
            try:
                devices.resolve_device("xpu")
            except devices.DeviceUnavailableError as error:
                assert "no Intel GPU" in str(error), error
                print("device refused", str(error).count(chr(10)))
    """)
    assert "device ok torch.xpu" in out or "device refused 0" in out
