"""crosskd: Cross-Head Knowledge Distillation for dense object detectors, as a command-line tool."""

__version__ = "0.2.0"
