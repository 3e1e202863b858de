import numpy as np
import pytest
import torch

from edmrt.models import GaussianMixture


def test_denoiser_satisfies_tweedie_against_finite_difference_score(gen):
    """D(x; sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie), grad by central differences."""
    g = GaussianMixture.random(K=5, D=6, seed=3)
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen) * 1.5
    for sigma in (0.05, 0.4, 2.0, 30.0):
        h = 1e-5 * max(1.0, sigma)
        grad = torch.zeros_like(x)
        for d in range(6):
            e = torch.zeros_like(x)
            e[:, d] = h
            grad[:, d] = (g.log_prob(x + e, sigma) - g.log_prob(x - e, sigma)) / (2 * h)
        D = g.denoise(x, sigma)
        np.testing.assert_allclose(D.numpy(), (x + sigma ** 2 * grad).numpy(), rtol=1e-6, atol=1e-6 * max(1, sigma))


def test_denoiser_is_the_posterior_mean_by_monte_carlo():
    """E[x_0 | x] against an importance-weighted Monte-Carlo estimate from data samples."""
    g = GaussianMixture.random(K=3, D=2, seed=5)
    x0 = g.sample(400_000, seed=1)
    x = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    sigma = 0.7
    for i in range(2):
        logw = -0.5 * ((x[i] - x0) ** 2).sum(1) / sigma ** 2
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        np.testing.assert_allclose(g.denoise(x[i:i + 1], sigma)[0].numpy(), mc.numpy(), atol=1e-2)


def test_ode_matches_closed_form_for_one_gaussian(gen):
    """One Gaussian: x(sigma) = mu + sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2) (x(sigma_0) - mu)."""
    mu = torch.randn(1, 16, dtype=torch.float64, generator=gen)
    s = 0.1 + torch.rand(1, 16, dtype=torch.float64, generator=gen)
    g = GaussianMixture(mu, s)
    x80 = 80.0 * torch.randn(3, 16, dtype=torch.float64, generator=gen)
    for sigma_to in (1.0, 0.002, 0.0):
        exact = mu + torch.sqrt(s ** 2 + sigma_to ** 2) / torch.sqrt(s ** 2 + 80.0 ** 2) * (x80 - mu)
        got = g.ode(x80, 80.0, sigma_to)
        np.testing.assert_allclose(got.numpy(), exact.numpy(), rtol=0, atol=1e-9)
    # Upward (an inversion), from near the data to noise: the same closed form.
    x0 = mu + 0.5 * torch.randn(3, 16, dtype=torch.float64, generator=gen)
    exact = mu + torch.sqrt(s ** 2 + 80.0 ** 2) / torch.sqrt(s ** 2 + 0.002 ** 2) * (x0 - mu)
    np.testing.assert_allclose(g.ode(x0, 0.002, 80.0).numpy(), exact.numpy(), rtol=1e-9, atol=1e-8)


def test_shapes_dtypes_and_errors(gen):
    g = GaussianMixture.random(K=4, D=12, seed=0)
    x = torch.randn(5, 3, 2, 2, generator=gen)  # float32, image-like shape with 12 values per sample
    D = g.denoise(x, torch.full((5, 1, 1, 1), 0.3))
    assert D.shape == x.shape and D.dtype == torch.float32
    np.testing.assert_allclose(D.numpy(), g.denoise(x.double(), 0.3).float().numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="12 values per sample"):
        g.denoise(torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="one value per sample"):
        g.denoise(x, torch.ones(3))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(np.zeros((2, 3)), 0.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(np.zeros((2, 3)), 1.0, [0.5, 0.6])
    for a, b in ((1.0, 1.0), (0.0, 2.0), (float("nan"), 1.0), (1.0, -1.0)):
        with pytest.raises(ValueError, match="sigma_from"):
            g.ode(x, a, b)
    s = g.sample(1000, seed=2)
    assert s.shape == (1000, 12) and s.dtype == torch.float64
    assert abs(float(s.mean()) - float((g.weights[:, None] * g.means).sum(0).mean())) < 0.1
