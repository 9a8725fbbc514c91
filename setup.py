"""Which packages the wheel holds (the rest of the metadata is in pyproject.toml): every ``sdv2_lab*`` folder, and
the top-level ``conf/`` shipped inside the package as ``sdv2_lab.conf``, so that an installed wheel finds its
configs (``sdv2_lab/configs.py``) as a checkout does."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["sdv2_lab", "sdv2_lab.*"]), "sdv2_lab.conf"],
      package_dir={"sdv2_lab.conf": "conf"})
