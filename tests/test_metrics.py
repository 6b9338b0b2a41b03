"""Quality metrics against dense: PSNR/SSIM per frame, LPIPS availability, relative L2."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from ditaccel import metrics


def frames(seed=0, shape=(4, 24, 32, 3)):
    return np.random.default_rng(seed).random(shape)


def noisy(ref, sigma, seed=1):
    return np.clip(ref + np.random.default_rng(seed).normal(0.0, sigma, ref.shape), 0.0, 1.0)


def test_identical_inputs_give_inf_psnr_and_unit_ssim():
    ref = frames()
    assert metrics.psnr(ref, ref.copy()) == math.inf
    assert metrics.ssim(ref, ref.copy()) == pytest.approx(1.0, abs=1e-6)
    assert metrics.latent_rel_l2(ref, ref.copy()) == 0.0
    assert metrics.attention_rel_error(torch.ones(2, 3), torch.ones(2, 3)) == 0.0


def test_psnr_matches_mse_formula_per_frame():
    ref = frames()
    test = noisy(ref, 0.05)
    mse = ((test - ref) ** 2).reshape(ref.shape[0], -1).mean(axis=1)
    expected = 10 * np.log10(1.0 / mse)
    got = metrics.psnr_per_frame(ref, test)
    # torchmetrics folds 10 / ln(10) in float32: agreement to ~1e-7 relative.
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert metrics.psnr(ref, test) == pytest.approx(expected.mean(), rel=1e-6)
    # data_range scales the peak: 255-range data of the same error reads the same PSNR.
    assert metrics.psnr(ref * 255, test * 255, data_range=255.0) == pytest.approx(expected.mean(), rel=1e-6)


def test_per_frame_average_differs_from_global_psnr():
    ref = frames()
    # One clean-ish frame and three noisy ones: mean of per-frame PSNRs != PSNR of pooled MSE.
    test = ref.copy()
    test[0] = noisy(ref[0], 0.005, seed=2)
    test[1:] = noisy(ref[1:], 0.2, seed=3)
    mse = ((test - ref) ** 2).reshape(4, -1).mean(axis=1)
    per_frame_mean = float(np.mean(10 * np.log10(1.0 / mse)))
    pooled = float(10 * np.log10(1.0 / mse.mean()))
    got = metrics.psnr(ref, test)
    assert got == pytest.approx(per_frame_mean, rel=1e-6)
    assert abs(got - pooled) > 1.0


def test_ssim_in_float32_matches_float64():
    from torchmetrics.functional.image import structural_similarity_index_measure

    ref = frames()
    test = noisy(ref, 0.1)
    r, t = (torch.from_numpy(np.ascontiguousarray(x)).double().permute(0, 3, 1, 2) for x in (ref, test))
    k = metrics._ssim_kernel(r.shape[2], r.shape[3])
    exact = structural_similarity_index_measure(t, r, data_range=1.0, kernel_size=k, sigma=1.5 * k / 11)
    assert metrics.ssim(ref, test) == pytest.approx(float(exact), abs=1e-6)


def test_ssim_is_per_frame_mean_and_drops_with_noise():
    ref = frames()
    light, heavy = noisy(ref, 0.02), noisy(ref, 0.3)
    assert 1.0 > metrics.ssim(ref, light) > metrics.ssim(ref, heavy)
    mixed = np.concatenate([light[:2], heavy[2:]])
    per_frame = [metrics.ssim(ref[i], mixed[i]) for i in range(4)]
    assert metrics.ssim(ref, mixed) == pytest.approx(np.mean(per_frame), rel=1e-6)


def test_accepts_torch_uint8_images_and_video_batches():
    ref = frames()
    test = noisy(ref, 0.05)
    base = metrics.psnr(ref, test)
    assert metrics.psnr(torch.from_numpy(ref), torch.from_numpy(test)) == pytest.approx(base)
    assert metrics.psnr(ref[None], test[None]) == pytest.approx(base)  # [B, F, H, W, C]
    assert metrics.psnr(ref[0], test[0]) == pytest.approx(metrics.psnr_per_frame(ref, test)[0])  # [H, W, C]
    u8_ref, u8_test = (ref * 255).round().astype(np.uint8), (test * 255).round().astype(np.uint8)
    expected = metrics.psnr(u8_ref / 255.0, u8_test / 255.0)
    assert metrics.psnr(u8_ref, u8_test) == pytest.approx(expected)


@pytest.mark.parametrize("fn", [metrics.psnr, metrics.ssim, metrics.compare_media])
def test_shape_mismatch_raises(fn):
    ref = frames()
    with pytest.raises(ValueError, match="differ in shape"):
        fn(ref, ref[:3])
    with pytest.raises(ValueError, match="differ in shape"):
        fn(ref, ref[:, :, :16])


def test_bad_layouts_and_values_raise():
    ref = frames()
    with pytest.raises(ValueError, match="channels-last"):
        metrics.psnr(ref.transpose(0, 3, 1, 2), ref.transpose(0, 3, 1, 2))  # [F, C, H, W]
    with pytest.raises(ValueError, match=r"image \[H, W, C\]"):
        metrics.psnr(ref[0, 0], ref[0, 0])  # 2-D
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.psnr(ref * 2, ref)
    bad = ref.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.ssim(ref, bad)
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        metrics.psnr(ref.tolist(), ref)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.latent_rel_l2(torch.zeros(2, 3), torch.zeros(3, 2))


def test_relative_errors():
    ref = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    delta = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    test = ref + 0.1 * delta
    expected = float((test.double() - ref.double()).norm() / ref.double().norm())
    assert metrics.latent_rel_l2(ref, test) == pytest.approx(expected, rel=1e-9)
    assert metrics.attention_rel_error(ref.numpy(), test.numpy()) == pytest.approx(expected, rel=1e-9)
    assert metrics.latent_rel_l2(torch.zeros(3), torch.ones(3)) == math.inf


def test_lpips_is_none_with_a_note_when_unavailable(monkeypatch, caplog):
    reason = "LPIPS skipped: test says its weights are absent"
    monkeypatch.setattr(metrics, "lpips_unavailable_reason", lambda: reason)
    monkeypatch.setattr(metrics, "_noted", set())
    ref = frames()
    with caplog.at_level(logging.WARNING, logger="ditaccel.metrics"):
        assert metrics.lpips(ref, noisy(ref, 0.1)) is None
        assert metrics.lpips(ref, noisy(ref, 0.1)) is None
    notes = [r for r in caplog.records if r.getMessage() == reason]
    assert len(notes) == 1 and "\n" not in notes[0].getMessage()
    report = metrics.compare_media(ref, noisy(ref, 0.1))
    assert report["lpips"] is None and report["lpips_note"] == reason


def test_lpips_availability_is_reported_honestly():
    reason = metrics.lpips_unavailable_reason()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert reason is not None and "torchvision" in reason
        return
    if reason is None:  # weights present locally: LPIPS runs and orders noise levels
        ref = frames(shape=(2, 64, 64, 3))
        assert metrics.lpips(ref, ref) == pytest.approx(0.0, abs=1e-6)
        assert metrics.lpips(ref, noisy(ref, 0.3)) > metrics.lpips(ref, noisy(ref, 0.02))
    else:
        assert "weights" in reason


def test_compare_media_collects_everything():
    ref = frames()
    test = noisy(ref, 0.05)
    lat_ref, lat_test = torch.ones(1, 4, 2, 4, 4), torch.full((1, 4, 2, 4, 4), 1.5)
    report = metrics.compare_media(ref, test, reference_latents=lat_ref, test_latents=lat_test)
    assert report["frames"] == 4
    assert report["psnr"] == pytest.approx(metrics.psnr(ref, test))
    assert report["psnr_min"] == pytest.approx(min(metrics.psnr_per_frame(ref, test)))
    assert report["ssim"] == pytest.approx(metrics.ssim(ref, test))
    assert report["latent_rel_l2"] == pytest.approx(0.5)
