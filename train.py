"""Train a classifier from a YAML config: `python train.py --config configs/quickstart.yaml`.

Any config value can be overridden on the command line (`--trainer.max_epochs 1`); `--print_config` shows
the fully resolved configuration. See README.md.
"""

from robustattr.cli import main

if __name__ == "__main__":
    main()
