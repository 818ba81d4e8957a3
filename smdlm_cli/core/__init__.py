"""The core of smdlm: SM operator, diffusion maths, models, data, trainer, run directories.

Importable without Typer or Rich; knows nothing of the command line.
"""
