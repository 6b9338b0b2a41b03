import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import their shared builders (tiny_pipelines)


@pytest.fixture
def tiny_wan():
    """A bare two-layer WanTransformer3DModel with seeded random weights."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64,
    ).eval()


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: several times faster than two on a shared,
    loaded CPU (the threads mostly wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
