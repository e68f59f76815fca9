"""Shared fixtures: tiny offline models and tokenizers (no hub), deterministic CPU settings."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the Makefile: trainer + servers share the cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import random

import pytest

# One seed per session for the global RNGs (random, numpy, torch), fresh unless TOPD_TEST_SEED is set, printed in
# pytest's header (without -q) and in every failing test's captured output: a test that draws from a global RNG
# is reproduced by rerunning it with that seed.
SESSION_SEED = int(os.environ.get("TOPD_TEST_SEED") or random.SystemRandom().randrange(2**31))


def pytest_report_header(config):
    return f"topd-ds test seed: {SESSION_SEED} (reproduce with TOPD_TEST_SEED={SESSION_SEED})"


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    """Every test starts from the session seed in random, numpy and torch, whatever ran before it."""
    import numpy as np
    import torch

    print(f"topd-ds test seed: {SESSION_SEED} (reproduce with TOPD_TEST_SEED={SESSION_SEED})")  # in a failure's report
    random.seed(SESSION_SEED)
    np.random.seed(SESSION_SEED % 2**32)
    torch.manual_seed(SESSION_SEED)
    yield


@pytest.fixture(scope="session")
def char_tokenizer():
    from topd_ds.tasks.chartok import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, char_tokenizer):
    """(teacher_dir, student_dir): random Qwen3 teacher (64 x 2) and student (32 x 1), same tokenizer."""
    from topd_ds.tasks.models import save_tiny_pair

    return save_tiny_pair(str(tmp_path_factory.mktemp("tiny_models")), char_tokenizer)
