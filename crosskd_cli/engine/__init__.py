"""The one training loop (Accelerate) and what it needs: devices and processes, precision, total
batch and lr schedule, state saving, progress and log lines.
"""
