"""The configs, installed inside the package as ``sdv2_lab.conf`` (see setup.py; found by sdv2_lab/configs.py)."""
