"""Loopline: learn from a product's own decisions, on Apache Beam and TFX.

`pip install -e .` for development; `--setup_file ./setup.py` ships the same packages to Dataflow
workers. Versions are pinned in requirements/lock.txt, not here, so the worker image and a
developer's venv resolve the same set.
"""

import setuptools

setuptools.setup(
    name="loopline",
    version="0.1.0",
    description="Join logged decisions with delayed observations, train with TFX, score with Beam.",
    python_requires=">=3.10,<3.11",
    packages=setuptools.find_packages(
        include=["loopline", "loopline.*", "transforms", "transforms.*", "pipelines", "pipelines.*"]
    ),
    package_data={"loopline": ["schemas/*.avsc"]},
    install_requires=[
        "apache-beam[gcp]>=2.61,<3",
        "fastavro",
        "pyyaml",
    ],
)
