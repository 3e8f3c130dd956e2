"""Configuration: typed presets and model specs, the strict parser, safe readers of untrusted
YAML/JSON. Torch-free; imports nothing of the package but errors.
"""
