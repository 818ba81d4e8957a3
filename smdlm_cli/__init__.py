"""smdlm: Soft-Masked Diffusion Language Models as a command-line toolkit and a small library."""

__version__ = "0.1.0"
