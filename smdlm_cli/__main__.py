"""`python -m smdlm_cli` runs the same CLI as the `smdlm` console script (and works under torchrun)."""

from smdlm_cli.cli.app import main

if __name__ == "__main__":
    main()
