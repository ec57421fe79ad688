"""Tokenizer tests run tiny problems: one intra-op thread avoids thread hand-off costs on a busy machine."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
