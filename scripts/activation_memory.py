"""Activation bytes kept for backward per token, per method, on SmolLM2-135M layer shapes (CPU, exact).

Run: python scripts/activation_memory.py  (prints the markdown table in docs/methods.md)
"""
import sys, torch, copy
from transformers import LlamaConfig, LlamaForCausalLM
from paca_core import prepare_model
from paca_core.config import *
from paca_core.memory.measure import count_saved_tensors
# SmolLM2-135M shapes, 2 layers, fp32
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, vocab_size=1024, tie_word_embeddings=True)
torch.manual_seed(0)
base = LlamaForCausalLM(cfg)
B, T = 2, 256
ids = torch.randint(0, 1024, (B, T))
def measure(name, configs):
    m = copy.deepcopy(base)
    if configs is None:
        for p in m.parameters(): p.requires_grad_(False)
    elif configs == "full":
        pass
    else:
        m = prepare_model(m, configs, device="cpu")
    m.train()
    emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
    with count_saved_tensors(m) as rep:
        out = m(inputs_embeds=emb)
    loss = out.logits.float().mean()
    loss.backward()
    per_layer_token = rep.activation_bytes / (B * T) / cfg.num_hidden_layers
    extra = "" if floor is None else f"{(per_layer_token - floor) / 1024:+.2f}"
    print(f"| {name} | {per_layer_token / 1024:.2f} | {extra or '0'} |")
    return per_layer_token


floor = None
print("| method | KiB kept for backward per token per decoder layer | over the frozen floor |")
print("|---|---|---|")
floor = measure("frozen (floor)", None)
measure("full fine-tuning", "full")
measure("LoRA r=8 (numerically PEFT LoRA)", [LoRAConfig(r=8)])
measure("LoRA r=8 + dropout 0.1", [LoRAConfig(r=8, dropout=0.1)])
measure("LoRA-FA r=8", [LoRAFAConfig(r=8)])
measure("LoRA r=8 + VeLoRA G=32", [LoRAConfig(r=8), VeLoRAConfig(num_groups=32)])
measure("PaCA r=8", [PaCAConfig(r=8)])
measure("PaCA r=64", [PaCAConfig(r=64)])
