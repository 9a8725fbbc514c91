"""``python -m sdv2_lab.eval [hydra overrides]`` = ``sdv2 eval``. Absolute import: Lightning's DDP launcher
may run this file directly as a script."""
from sdv2_lab.eval.cli import main

if __name__ == "__main__":
    main()
