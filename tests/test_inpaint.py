"""Zero-shot inpainting (``edmrt.inpaint``): Song et al. 2023, Alg. 4, by the fused step with known pixels
re-imposed on D (``InpaintEngine``).

- Against Alg. 4 written out literally with the bundled consistency student (digits-cd) as f and the same noise
  draws: equal to float precision; the kept pixels come back exactly.
- On the held-out digits with the bottom half masked: the student fills it, class-conditionally, so that the
  project's classifier reads most of them as their class (benchmarks/edit.py has the full study with FD).
- Masked editing (another class) changes only the masked half; bad masks are refused by name.
"""
import numpy as np
import pytest
import torch

import edmrt
from edmrt.kernels.philox import INITIAL_STREAM, philox_normal, stage_stream

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="module")
def digits():
    from edmrt.lab.common import load_digits_split

    x, y = load_digits_split("test")
    return torch.as_tensor(x[:40]).float(), [int(v) for v in y[:40]]


def _bottom_half(n):
    m = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    m[:, :, 4:] = True
    return m


def test_inpainting_is_algorithm_4_of_consistency_models(digits):
    from edmrt.lab.common import denoise

    x, y = digits
    model = edmrt.load("digits-cd")
    plan = edmrt.Sampler(model).plan
    assert plan.solver == "consistency"
    mask = _bottom_half(len(y))
    seeds = torch.arange(len(y)) + 100
    ours = edmrt.inpaint(model, x, mask, cond=y, seeds=seeds.tolist(), backend="torch")
    # Alg. 4 literally: tau_0 = t_0, then the plan's levels; f = the student's denoiser (EDM Eq. 7).
    m, keep = mask.float(), 1.0 - mask.float()
    labels = torch.tensor(y)
    with torch.no_grad():
        state = x * keep + float(plan.sigmas[0]) * philox_normal(seeds, INITIAL_STREAM, (1, 8, 8))
        for s in range(plan.stages):
            sig = torch.full((len(y),), float(plan.sigma[s]))
            state = denoise(model.network, model.precond, state, sig, labels)
            state = x * keep + state * m
            if plan.n[s] != 0:
                state = state + float(plan.n[s]) * philox_normal(seeds, stage_stream(s), (1, 8, 8))
    assert (ours - state).abs().max().item() <= 1e-5
    assert torch.equal(ours[~mask.expand_as(x)], x[~mask.expand_as(x)])
    # The check can fail: without re-imposing (plain sampling from the same start) it is far off.
    free = edmrt.Sampler(model, backend="torch").sample(seeds.tolist(), cond=y)
    assert (free - state)[mask.expand_as(x)].abs().max().item() > 0.1


def test_the_student_fills_masked_halves_in_class(digits):
    from edmrt.lab.metrics import class_accuracy

    x, y = digits
    out = edmrt.inpaint(edmrt.load("digits-cd"), x, _bottom_half(len(y)), cond=y)
    # benchmarks/edit.py: 2 steps, the 197 digits of test half A: 98% (bottom half), the real digits 99%.
    assert class_accuracy(out, y) >= 0.75
    wrong = edmrt.inpaint(edmrt.load("digits-cd"), x, _bottom_half(len(y)), cond=[(v + 5) % 10 for v in y])
    assert (wrong - out)[:, :, 4:].abs().mean().item() > 0.1     # another class regenerates the masked half
    assert torch.equal(wrong[:, :, :4], x[:, :, :4])             # and keeps the rest


def test_the_teacher_inpaints_too_and_bad_masks_are_refused(digits):
    x, y = digits
    teacher = edmrt.load("digits")
    out = edmrt.inpaint(teacher, x[:8], _bottom_half(8)[0, 0], cond=y[:8], solver="heun", steps=10)
    assert out.shape == x[:8].shape and torch.equal(out[:, :, :4], x[:8, :, :4])
    for bad, match in ((torch.full((8, 8), 0.5), "0 \\(keep\\) and 1 \\(generate\\)"),
                       (torch.ones(5, 5, dtype=torch.bool), r"with \(H, W\) = \(8, 8\)"),
                       (torch.ones(3, 1, 8, 8, dtype=torch.bool), "N = 8"),
                       ([[1, 0]], "mask must be a tensor")):
        with pytest.raises(ValueError, match=match):
            edmrt.inpaint(teacher, x[:8], bad, cond=y[:8])
    with pytest.raises(ValueError, match="seeds: one per image"):
        edmrt.inpaint(teacher, x[:8], _bottom_half(8), cond=y[:8], seeds=[1, 2])
