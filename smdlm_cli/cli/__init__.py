"""The `smdlm` command line (Typer): parsing and printing only, over commands/ and the library.

app.py holds the root group, error handling and the entry point; options.py declares every
option once; train.py, sample.py, evaluate.py and reproduce.py hold the subcommands.
"""
