from setuptools import find_packages, setup

with open("requirements.txt") as f:
    install_requires = [l.strip() for l in f if l.strip() and not l.startswith("#")]

setup(
    name="topd-ds",
    version="0.1.0",
    description="On-policy distillation (OPD) and trajectory-aware TOPD on DeepSpeed ZeRO-3",
    packages=find_packages(include=["topd_ds", "topd_ds.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        # No "sglang" extra: sglang 0.5.23 (the version checked, docs/ENGINES.md) requires torch==2.14.1 and
        # transformers==5.19.0, and the trainer pins torch==2.13.0, so the two cannot share one environment.
        # The servers get their own: docs/INSTALL.md.
        "pot": ["pot"],
        "eval": ["math-verify"],
    },
    entry_points={"console_scripts": ["topd-ds=topd_ds.cli:main"]},
)
