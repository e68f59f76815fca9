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
        # SGLang has no CPU wheel; install it on GPU machines (see README, "Servers").
        "sglang": ["sglang>=0.5.23"],
        "pot": ["pot"],
        "eval": ["math-verify"],
    },
    entry_points={"console_scripts": ["topd-ds=topd_ds.cli:main"]},
)
