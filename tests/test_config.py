"""Bad configs raise ValueError naming the field and what is allowed; good ones normalise."""

from __future__ import annotations

import pytest
import torch

import ditaccel
from ditaccel import RadialConfig, TileConfig, WindowConfig
from ditaccel.config import AttentionConfig
from ditaccel.methods import make_method
from ditaccel.methods.base import CallShape

INVALID = [
    # (what to build, text the message must contain)
    (lambda: WindowConfig(kernel_size=(3, -3, 3)), "kernel_size"),
    (lambda: WindowConfig(kernel_size=(3, 0, 3)), "kernel_size"),
    (lambda: WindowConfig(kernel_size=(3, 4, 3)), "odd"),
    (lambda: WindowConfig(kernel_size=4), "odd"),
    (lambda: WindowConfig(kernel_size=(3, 3, 3, 3)), "kernel_size"),
    (lambda: WindowConfig(kernel_size="3x3"), "kernel_size"),
    (lambda: WindowConfig(kernel_size=(3.0, 3, 3)), "kernel_size[t] must be an int"),
    (lambda: WindowConfig(dilation=(1, 0, 1)), "dilation"),
    (lambda: WindowConfig(dilation=-2), "dilation"),
    (lambda: WindowConfig(order="zigzag"), "order"),
    (lambda: WindowConfig(tile=(0, 4, 4)), "tile"),
    (lambda: TileConfig(window=(2, 3, 3)), "window"),
    (lambda: TileConfig(window=0), "window"),
    (lambda: TileConfig(tile=(4, 4, 4)), "block_size"),
    (lambda: TileConfig(tile=(2, 4, 8), block_size=128), "product"),
    (lambda: TileConfig(tile=(2, -4, 8)), "tile"),
    (lambda: RadialConfig(decay=0.0), "decay"),
    (lambda: RadialConfig(decay=1.5), "decay"),
    (lambda: RadialConfig(decay="half"), "decay"),
    (lambda: RadialConfig(sink_frames=-1), "sink_frames"),
    (lambda: RadialConfig(sink_frames=1.5), "sink_frames"),
    (lambda: TileConfig(dense_steps=-1), "dense_steps"),
    (lambda: TileConfig(dense_steps=True), "dense_steps"),
    (lambda: TileConfig(dense_layers=(0, -1)), "dense_layers"),
    (lambda: TileConfig(dense_layers="all"), "dense_layers"),
    (lambda: TileConfig(block_size=96), "block_size"),
    (lambda: TileConfig(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("build,needle", INVALID)
def test_invalid_config_raises_naming_field(build, needle):
    with pytest.raises(ValueError) as err:
        build()
    message = str(err.value)
    assert needle in message
    assert "Config." in message  # names the config class and field


@pytest.mark.parametrize("grid,kernel,dilation,axis", [
    ((5, 7, 9), (3, 9, 3), (1, 1, 1), "h"),
    ((5, 7, 9), (3, 3, 5), (1, 1, 2), "w"),
    ((1, 7, 9), (3, 3, 3), (1, 1, 1), "t"),  # a 3-D window on an image model
])
def test_kernel_times_dilation_larger_than_grid(grid, kernel, dilation, axis):
    """Not an error (any resolution works): the window covers that axis, and the method says so."""
    method = make_method(WindowConfig(kernel_size=kernel, dilation=dilation, block_size=64))
    plan = method.plan(CallShape(grid, 0, "none"), "cpu")
    assert 0 < plan.density <= 1
    assert any(f"kernel_size[{axis}]" in note and "covers that axis" in note for note in method.notes)


def test_unknown_method_and_field(tiny_wan):
    with pytest.raises(ValueError, match="method must be one of"):
        ditaccel.accelerate(tiny_wan, "sparse-magic")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['windw'\].*allowed"):
        ditaccel.accelerate(tiny_wan, "tile", windw=(3, 3, 3))
    with pytest.raises(ValueError, match="TileConfig.window"):
        ditaccel.accelerate(tiny_wan, "tile", window=(2, 2, 2))
    with pytest.raises(ValueError, match="method must be one of"):
        ditaccel.accelerate(tiny_wan, 3)


def test_normalisation():
    assert WindowConfig(kernel_size=5).kernel_size == (5, 5, 5)
    assert WindowConfig(kernel_size=(3, 5)).kernel_size == (1, 3, 5)
    assert TileConfig(dense_layers=[3, 1, 3]).dense_layers == (1, 3)
    assert TileConfig(dense_layers=2).layer_is_dense(1) and not TileConfig(dense_layers=2).layer_is_dense(2)
    cfg = TileConfig(window=(1, 3, 3))
    assert cfg.to_dict()["method"] == "tile"
    assert issubclass(TileConfig, AttentionConfig)


def test_bad_layout_inputs():
    from ditaccel.layout import build_layout

    with pytest.raises(ValueError, match="text_position"):
        build_layout((2, 2, 2), 3, "middle")
    with pytest.raises(ValueError, match="grid"):
        build_layout((0, 2, 2), 0, "none")
    with pytest.raises(ValueError, match="text_len"):
        build_layout((2, 2, 2), 3, "none")


def test_unsupported_model_lists_families():
    with pytest.raises(ValueError) as err:
        ditaccel.accelerate(torch.nn.Linear(2, 2))
    msg = str(err.value)
    assert "Linear" in msg
    for family in ("wan", "hunyuan_video", "cogvideox", "flux"):
        assert family in msg
