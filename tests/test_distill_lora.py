"""A few-step adapter of our own (`edmrt distill --lora RANK [--dora]`): consistency distillation into a LoRA / DoRA
on the frozen teacher, its peft folder + edmrt card, loading it with edmrt.load(..., adapters=...), the swap rules
it brings, and the shipped digits-cd-lora's measured rates."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
peft = pytest.importorskip("peft")

import edmrt  # noqa: E402
from edmrt.cli import main  # noqa: E402
from edmrt.lab.common import SIGMA_DATA  # noqa: E402
from edmrt.lab.distill import (DistillOptions, adapted_model, adapter_targets, distill, export_adapter,  # noqa: E402
                               student_model)
from edmrt.lab.train import TrainOptions, train  # noqa: E402
from edmrt.loading import with_adapters  # noqa: E402
from edmrt.models.bundled import WEIGHTS_DIR  # noqa: E402

LEVELS = {"levels": {"1": [80.0, 0.0], "2": [80.0, 1.5, 0.0]}, "fd_train": {"1": 9.0, "2": 8.0}}


@pytest.fixture(scope="module")
def tiny_teacher():
    r = train(TrainOptions(config="tiny", iters=40, batch=32, lr=3e-3, warmup=5, seed=3), progress=False)
    return edmrt.Model(r.ema, edmrt.EDMPrecond(SIGMA_DATA), sample_shape=(1, 8, 8), num_classes=10,
                       metadata={"name": "tiny-teacher"})


def fresh(teacher):
    """A copy of the teacher model with its own network (adapters are fused into a network in place)."""
    return edmrt.Model(copy.deepcopy(teacher.network), teacher.precond, sample_shape=teacher.sample_shape,
                       num_classes=teacher.num_classes, metadata=dict(teacher.metadata))


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_run_trains_only_the_adapter_and_exports_a_peft_folder(tiny_teacher, tmp_path, dora):
    before = {k: v.clone() for k, v in tiny_teacher.network.state_dict().items()}
    opts = DistillOptions(iters=5, batch=8, N=6, lr=1e-2, warmup=1, seed=2, lora_rank=2, dora=dora)
    r = distill(tiny_teacher, opts, progress=False)
    assert r.adapter_config is not None and r.adapter_config.use_dora is dora and r.adapter_config.r == 2
    adapted = {n for n, m in r.student.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(adapter_targets(tiny_teacher.network)) and adapted
    # the teacher is untouched; every base weight of the student is the teacher's, bit for bit; the adapter moved
    assert all(torch.equal(v, before[k]) for k, v in tiny_teacher.network.state_dict().items())
    trained = {n for n, p in r.student.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    for n, p in r.student.named_parameters():
        if "lora_" not in n:
            live = n.replace(".base_layer.", ".")
            assert torch.equal(p, before[live]), n
    b = {n: p for n, p in r.ema.named_parameters() if "lora_B" in n}
    assert any(float(p.abs().max()) > 0 for p in b.values())          # B starts at 0: training moved it
    folder = tmp_path / "tiny-cd-lora"
    card = export_adapter(r, tiny_teacher, folder, {"command": "test"}, LEVELS)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "edmrt.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~mask        # a plain folder, not mkdtemp's private one
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~mask for f in folder.iterdir())
    assert card["base"] == "tiny-teacher" and card["adapter"] == ("DoRA" if dora else "LoRA") and card["rank"] == 2
    assert card["precond"] == {"name": "cm", "sigma_data": SIGMA_DATA, "sigma_min": 0.002}
    assert json.loads((folder / "edmrt.json").read_text()) == json.loads(json.dumps(card))
    # peft itself reads the folder back: its config and its tensors are the run's
    cfg = peft.LoraConfig.from_pretrained(str(folder))
    assert cfg.use_dora is dora and cfg.r == 2

    # loaded like any adapter: a consistency model over the teacher's network with the adapter fused
    m = with_adapters(fresh(tiny_teacher), {str(folder): 1.0})
    assert m.precond == edmrt.ConsistencyPrecond(SIGMA_DATA, 0.002)
    assert m.metadata["few_step_adapter"] == "tiny-cd-lora" and m.metadata["base_precond"]["name"] == "edm"
    s = edmrt.Sampler(m, backend="torch", device="cpu")                # the adapter card's defaults
    assert (s.solver, s.steps) == ("consistency", 2)
    np.testing.assert_array_equal(s.plan.sigmas, [80.0, 1.5, 0.0])
    x = s.sample(range(6), cond=[0, 1, 2, 3, 4, 5])
    # ... equal to the run's EMA network with peft's unmerged layers (the fused weights are peft's merge)
    y = edmrt.Sampler(student_model(r, tiny_teacher, {"sampling": card["sampling"]}), backend="torch",
                      device="cpu").sample(range(6), cond=[0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    z = edmrt.Sampler(adapted_model(r, tiny_teacher), steps=2, schedule=[80.0, 1.5, 0.0], solver="consistency",
                      backend="torch", device="cpu").sample(range(6), cond=[0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(x, z, rtol=0, atol=0)
    # exporting again replaces the folder; a path that is not an adapter folder is refused
    export_adapter(r, tiny_teacher, folder, {"command": "again"})
    assert json.loads((folder / "edmrt.json").read_text())["command"] == "again"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an adapter folder"):
        export_adapter(r, tiny_teacher, tmp_path / "other", {})
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_adapter_resume_equals_uninterrupted(tiny_teacher, tmp_path):
    opts = dict(batch=8, N=6, warmup=2, seed=4, lora_rank=3, dora=True)
    full = distill(tiny_teacher, DistillOptions(iters=4, **opts), progress=False)
    distill(tiny_teacher, DistillOptions(iters=2, **opts), checkpoint=tmp_path / "ck", progress=False)
    resumed = distill(tiny_teacher, DistillOptions(iters=4, **opts), resume=tmp_path / "ck", progress=False)
    assert resumed.losses == full.losses
    a, b = full.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_callback_sees_the_ema_every_k_iterations(tiny_teacher):
    seen = []
    distill(tiny_teacher, DistillOptions(iters=5, batch=4, N=6, lora_rank=1), progress=False,
            callback=lambda r: seen.append((r.step, r.ema.training)), callback_every=2)
    assert seen == [(2, False), (4, False), (5, False)]


@pytest.mark.parametrize("kw,match", [(dict(dora=True), "dora"), (dict(lora_rank=-1), "lora_rank"),
                                      (dict(lora_rank=2, lora_alpha=0.0), "lora_alpha"),
                                      (dict(lora_rank=2, dora=1), "dora")])
def test_bad_adapter_options(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillOptions(**kw)


def test_adapter_rules_on_load_and_swap(tiny_teacher, tmp_path):
    r = distill(tiny_teacher, DistillOptions(iters=2, batch=4, N=6, lora_rank=2), progress=False)
    export_adapter(r, tiny_teacher, tmp_path / "a", {}, LEVELS)
    export_adapter(r, tiny_teacher, tmp_path / "b", {}, LEVELS)
    # trained on another base: refused by name
    other = fresh(tiny_teacher)
    other.metadata["name"] = "someone-else"
    with pytest.raises(ValueError, match="trained on 'tiny-teacher'"):
        with_adapters(other, {str(tmp_path / "a"): 1.0})
    # two few-step adapters set the preconditioning twice
    with pytest.raises(ValueError, match="few-step"):
        with_adapters(fresh(tiny_teacher), {str(tmp_path / "a"): 0.5, str(tmp_path / "b"): 0.5})
    for bad, match in (({}, "non-empty"), ({str(tmp_path / "none"): 1.0}, "neither a bundled adapter"),
                       ({str(tmp_path / "a"): float("nan")}, "finite")):
        with pytest.raises(ValueError, match=match):
            with_adapters(fresh(tiny_teacher), bad)
    # a sampler built for the consistency model refuses a swap back to the base (EDM) weights, and accepts a
    # swap between weights of the same few-step adapter
    m = with_adapters(fresh(tiny_teacher), {str(tmp_path / "a"): 1.0})
    s = edmrt.Sampler(m, backend="torch", device="cpu")
    with pytest.raises(ValueError, match="preconditioning"):
        s.set_adapters({})
    s.set_adapters({"a": 0.5})
    assert m.adapters.active == {"a": 0.5}


def test_cli_distill_lora_writes_an_adapter_folder(tmp_path, capsys):
    out = tmp_path / "ad"
    assert main(["distill", "--lora", "2", "--dora", "--iters", "2", "--batch", "4", "--max-steps", "1", "--quiet",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "into a rank-2 DoRA for 2 iterations" in text and (out / "adapter_model.safetensors").is_file()
    card = json.loads((out / "edmrt.json").read_text())
    assert card["base"] == "digits" and card["distillation"]["lr"] == 1e-3 and card["command"].startswith(
        "edmrt distill --lora 2 --dora")
    m = edmrt.load("digits", adapters={str(out): 1.0})
    assert m.precond.name == "cm" and m.metadata["few_step_adapter"] == "ad"
    assert main(["distill", "--dora", "--iters", "1"]) == 2                  # --dora needs --lora


# ---------------------------------------------------------------- the shipped adapter
def _adapter_card():
    return json.loads((WEIGHTS_DIR / "digits-cd-lora" / "edmrt.json").read_text())


def test_shipped_adapter_is_a_small_peft_folder_with_its_card():
    folder = WEIGHTS_DIR / "digits-cd-lora"
    card = _adapter_card()
    assert card["base"] == "digits" and card["precond"]["name"] == "cm"
    for key in ("command", "machine", "distillation", "metrics", "sampling", "rank", "adapter"):
        assert key in card
    assert (folder / "adapter_model.safetensors").stat().st_size < 4_000_000
    assert (folder / "adapter_model.safetensors").stat().st_size < (WEIGHTS_DIR / "digits.safetensors").stat().st_size
    levels = card["sampling"]["levels"]
    for k, lv in levels.items():
        assert len(lv) == int(k) + 1 and lv[0] == 80.0 and lv[-1] == 0.0 and all(np.diff(lv) < 0)


@pytest.mark.parametrize("solver,steps", [("consistency", 1), ("consistency", 2), ("tcd", 2)])
def test_shipped_adapter_samples_at_the_card_rate(solver, steps):
    """edmrt.load("digits", adapters={"digits-cd-lora": 1.0}): the card's accuracy and FD on seeds 0..196."""
    from edmrt.lab.metrics import evaluate_digits

    run = next(r for r in _adapter_card()["metrics"]["runs"] if r["solver"] == solver and r["steps"] == steps)
    model = edmrt.load("digits", adapters={"digits-cd-lora": 1.0})
    got = evaluate_digits(model, solver, steps, **run["options"])
    assert got["nfe"] == steps and got["sigmas"] == run["sigmas"]
    assert got["class_accuracy"] >= run["class_accuracy"] - 0.02 and got["class_accuracy"] >= 0.9
    assert abs(got["fd_digits"] - run["fd_digits"]) <= 0.1 * run["fd_digits"]
    # the teacher alone at the same 2 NFE is far worse: the adapter is what makes few steps work
    if solver == "consistency" and steps == 2:
        base = evaluate_digits(edmrt.load("digits"), "euler", 2)
        assert base["fd_digits"] > 3 * got["fd_digits"]


def test_cli_sample_with_the_shipped_adapter(tmp_path, capsys):
    out = tmp_path / "lora.png"
    assert main(["sample", "--model", "digits", "--adapter", "digits-cd-lora", "--steps", "2", "--seeds", "0-9",
                 "--backend", "torch", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "with consistency, 2 steps, NFE 2" in text and "adapters digits-cd-lora=1" in text
    assert out.stat().st_size > 1000
    for bad in (["--adapter", "digits-cd-lora=abc"], ["--adapter", "nowhere-lora"],
                ["--adapter", "digits-cd-lora", "--onnx", str(tmp_path / "x.onnx")]):
        assert main(["sample", "--model", "digits", "--seeds", "0", *bad, "-o", str(out)]) == 2
