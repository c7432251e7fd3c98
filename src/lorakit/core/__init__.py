"""The library floor: LoRA layers, configs, injection into any model, adapter state, files, quantized bases.

Imports only torch, safetensors and itself; every other floor builds on it.
"""
