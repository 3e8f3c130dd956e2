"""Checkpoint files: the crosskd .safetensors format, key names of older versions, safe unpickling,
MMDetection import.
"""
