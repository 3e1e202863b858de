"""General conditioning: named inputs (embeddings, added conditions, class labels) through the Sampler, with
classifier-free guidance in one batch, equal to the float64 reference executor on the same noise."""
import pytest
import torch

import edmrt
from edmrt import CondInput
from edmrt.kernels.philox import INITIAL_STREAM, philox_normal

L, D = 3, 5
INPUTS = (CondInput("encoder_hidden_states", (L, D)), CondInput("time_ids", (6,), null="cond"),
          CondInput("class_labels", (), torch.int64, null=4, num_classes=4))


class TextNet(torch.nn.Module):
    """F depends on every input, nonlinearly, per sample: a wrong row, a wrong half or a dropped input shows."""

    cond_inputs = INPUTS

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(L * D, 8, generator=g) / 4)
        self.calls = 0

    def forward(self, x_in, c_noise, encoder_hidden_states, time_ids, class_labels):
        self.calls += 1
        B = x_in.shape[0]
        e = torch.tanh(encoder_hidden_states.reshape(B, -1).to(self.w.dtype) @ self.w)          # (B, 8)
        shift = e + time_ids.to(e.dtype).mean(1, keepdim=True) / 10 + class_labels.to(e.dtype)[:, None] / 4
        x = x_in.reshape(B, 8)
        return (torch.tanh(x) * (1 + shift.abs()) / 2 + shift * torch.exp(c_noise.reshape(B, 1))).to(x_in.dtype)


def _cond(N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(N, L, D, generator=g),
            "time_ids": torch.tensor([64.0, 64, 0, 0, 64, 64]).repeat(N, 1) + torch.arange(N)[:, None],
            "class_labels": torch.arange(N) % 4}


def _reference(net, plan, seeds, cond, uncond=None, w=None, x_init=None):
    """The float64 reference executor on the same Philox streams, guidance applied to F over the two halves."""
    B = len(seeds)
    if x_init is None:
        x_init = float(plan.sigmas[0]) * philox_normal(seeds, INITIAL_STREAM, (8,)).double()
    cond64 = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}

    def F(x_in, c_noise):
        f_c = net.double()(x_in, c_noise, **cond64)
        if w is None:
            return f_c
        un = {"encoder_hidden_states": uncond["encoder_hidden_states"].double(), "time_ids": cond64["time_ids"],
              "class_labels": torch.full((B,), 4)}
        f_u = net(x_in, c_noise, **un)
        return f_u + w * (f_c - f_u)
    noise = edmrt.SeededNoise(seeds, (8,)) if plan.stochastic else None
    out = edmrt.execute(plan, F, x_init, noise)
    net.float()
    return out


def _model(net=None, **kw):
    return edmrt.Model(net or TextNet(), edmrt.EDMPrecond(), sample_shape=(8,), **kw)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "heun"])
def test_named_inputs_with_guidance_equal_the_reference(solver):
    net = TextNet()
    s = edmrt.Sampler(_model(net), solver=solver, steps=6, backend="torch")
    seeds, cond, neg = [3, 1, 4], _cond(3), {"encoder_hidden_states": torch.randn(3, L, D)}
    net.calls = 0
    out = s.sample(seeds, cond=cond, uncond=neg, guidance=3.0)
    assert net.calls == s.plan.nfe  # both halves in one batch: one network call per stage
    ref = _reference(net, s.plan, seeds, cond, neg, w=3.0)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    plain = s.sample(seeds, cond=cond)
    assert (plain.double() - _reference(net, s.plan, seeds, cond)).abs().max().item() <= 1e-5 * 10
    assert (plain - out).abs().max().item() > 1e-2  # guidance changed the result


def test_one_value_for_all_is_broadcast_and_a_sample_does_not_depend_on_its_batch():
    s = edmrt.Sampler(_model(), solver="euler", steps=5, backend="torch")
    one = _cond(1)
    a = s.sample([7, 8, 9], cond={k: v[0] for k, v in one.items()})
    b = s.sample([7, 8, 9], cond={k: v.expand(3, *v.shape[1:]) for k, v in one.items()})
    assert torch.equal(a, b)
    cond = _cond(4)
    batch = s.sample([0, 1, 2, 3], cond=cond)
    alone = s.sample([2], cond={k: v[2:3] for k, v in cond.items()})
    assert (batch[2] - alone[0]).abs().max().item() <= 1e-5


def test_given_noise_starts_at_sigma_max_times_noise():
    net = TextNet()
    s = edmrt.Sampler(_model(net), solver="dpmpp_2m", steps=6, backend="torch")
    noise = torch.randn(2, 8)
    cond = _cond(2)
    out = s.sample([0, 1], cond=cond, noise=noise)
    ref = _reference(net, s.plan, [0, 1], cond, x_init=float(s.plan.sigmas[0]) * noise.double())
    assert (out.double() - ref).abs().max().item() <= 1e-4
    assert (out - s.sample([0, 1], cond=cond)).abs().max().item() > 1e-2  # the seeds' draw was replaced


def test_a_decoder_turns_latents_into_uint8_images():
    decoder = lambda z: torch.tanh(z.reshape(-1, 2, 2, 2)[:, :1].expand(-1, 3, -1, -1) * 3)  # noqa: E731
    s = edmrt.Sampler(_model(decoder=decoder), solver="euler", steps=4, backend="torch")
    cond = _cond(2)
    img = s.sample([0, 1], cond=cond)
    lat = s.sample([0, 1], cond=cond, output="latent")
    assert img.dtype == torch.uint8 and img.shape == (2, 3, 2, 2)
    want = ((decoder(lat).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(img, want)
    with pytest.raises(ValueError, match="output must be 'latent' or 'image'"):
        s.sample([0], cond=_cond(1), output="png")
    with pytest.raises(ValueError, match="needs a model with a decoder"):
        edmrt.Sampler(_model(), solver="euler", steps=2, backend="torch").sample([0], cond=_cond(1), output="image")


@pytest.mark.parametrize("kw,match", [
    (dict(cond=None), "cond must give 'encoder_hidden_states'"),
    (dict(cond={"time_ids": torch.zeros(6)}), "cond must give 'encoder_hidden_states'"),
    (dict(cond={**_cond(2), "pooled": torch.zeros(2, 4)}), r"cond has inputs \['pooled'\] the model does not take"),
    (dict(cond={**_cond(2), "encoder_hidden_states": torch.zeros(2, L, D + 1)}), r"shape \(2, 3, 5\)"),
    (dict(cond={**_cond(2), "encoder_hidden_states": torch.full((2, L, D), float("nan"))}), "NaN or Inf"),
    (dict(cond={**_cond(2), "class_labels": torch.tensor([0.0, 1.0])}), r"one class in \[0, 4\)"),
    (dict(cond={**_cond(2), "class_labels": torch.tensor([0, 4])}), r"one class in \[0, 4\)"),
    (dict(cond={**_cond(2), "encoder_hidden_states": torch.ones(2, L, D, dtype=torch.complex64)}), "real numbers"),
    (dict(cond=_cond(2), guidance=2.0), r"needs uncond for \['encoder_hidden_states'\]"),
    (dict(cond=_cond(2), uncond={"encoder_hidden_states": torch.zeros(2, L, D)}), "only with classifier-free"),
    (dict(cond=_cond(2), uncond={"nope": 1}, guidance=2.0), r"uncond has inputs \['nope'\]"),
    (dict(cond=_cond(2), noise=torch.randn(2, 9)), r"noise must be a floating-point tensor of shape \(2, 8\)"),
    (dict(cond=_cond(2), noise=torch.full((2, 8), float("inf"))), "noise must be finite"),
])
def test_bad_conditioning_is_refused_by_name(kw, match):
    s = edmrt.Sampler(_model(), solver="euler", steps=3, backend="torch")
    with pytest.raises(ValueError, match=match):
        s.sample([0, 1], **kw)


def test_class_labels_are_one_case_of_the_general_inputs():
    m = edmrt.Model(lambda x, c, class_labels: x * 0 + class_labels[:, None].float(), edmrt.Identity(),
                    sample_shape=(3,), num_classes=5)
    assert m.cond == (CondInput("class_labels", (), torch.int64, null=5, num_classes=5),)
    s = edmrt.Sampler(m, solver="euler", steps=2, backend="torch")
    assert torch.equal(s.sample([0, 1], cond=[2, 3]), s.sample([0, 1], cond={"class_labels": torch.tensor([2, 3])}))
    assert torch.allclose(s.sample([0], cond=None), torch.full((1, 3), 5.0))  # unconditional: the null label


@pytest.mark.parametrize("kw,match", [
    (dict(name="x_in"), "identifier other than x_in"), (dict(name="a b"), "identifier"),
    (dict(name="e", shape=(0, 3)), "shape must be a sequence of ints >= 1"),
    (dict(name="e", dtype=torch.complex64), "dtype must be one of"),
    (dict(name="e", null="zero"), "null must be a finite number, 'cond' or None"),
    (dict(name="e", num_classes=3), "must have dtype torch.int64"),
])
def test_cond_input_declarations_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        CondInput(**kw)
    with pytest.raises(ValueError, match="names must be unique"):
        _model(cond=(CondInput("e"), CondInput("e")))
