"""A live adapter swap never tears a running request: the weights are the network's, and the lock that guards a swap
(``AdapterSet.swap``) is held by every request that reads them, whichever Sampler or engine runs it.

Before, ``set_adapters`` waited only for the engines its own Sampler still held: a request on an engine just evicted
from the LRU, or on a second Sampler over the same Model, ran through the swap and came out as neither the base's
images nor the adapter's.  Here threads sample from two Samplers on one Model (one keeps a single engine, so its
two batch sizes evict each other) while another thread swaps the adapter in and out; every result must equal the
base's or the adapter's, bit for bit (the torch backend on the CPU is deterministic per batch size).
"""
import shutil
import threading

import pytest
import torch

import edmrt

pytest.importorskip("peft", reason="peft (the adapters extra) is not installed")

from edmrt.adapters.lora import load_adapter  # noqa: E402
from edmrt.models.bundled import WEIGHTS_DIR  # noqa: E402


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "style"
    shutil.copytree(WEIGHTS_DIR / "digits-cd-lora", folder)
    (folder / "edmrt.json").unlink()   # a plain adapter on the teacher (no few-step card)
    m = edmrt.load("digits")
    load_adapter(m, folder, "style")
    return m


def test_swaps_under_load_give_the_base_or_the_adapter_bit_for_bit(model):
    samplers = [edmrt.Sampler(model, solver="heun", steps=8, backend="torch", device="cpu", max_engines=1),
                edmrt.Sampler(model, solver="heun", steps=8, backend="torch", device="cpu")]
    cases = [(0, [1, 2, 3]), (0, [4, 5]), (1, [6, 7, 8])]   # sampler 0 alternates batch 3 and 2: evictions
    refs = {}
    for state in ("base", "style"):
        samplers[0].set_adapters({"style": 1.0} if state == "style" else None)
        for i, seeds in cases:
            refs[state, i, tuple(seeds)] = samplers[i].sample(seeds, cond=[s % 10 for s in seeds], guidance=2.0)
    samplers[0].set_adapters(None)
    assert not torch.equal(refs["base", 1, (6, 7, 8)], refs["style", 1, (6, 7, 8)])
    stop, torn, seen, errors = threading.Event(), [], set(), []

    def sample(i, seeds):
        try:
            while not stop.is_set():
                x = samplers[i].sample(seeds, cond=[s % 10 for s in seeds], guidance=2.0)
                match = [s for s in ("base", "style") if torch.equal(x, refs[s, i, tuple(seeds)])]
                seen.update(match)
                if not match:
                    torn.append((i, seeds, min((x - refs[s, i, tuple(seeds)]).abs().max().item()
                                               for s in ("base", "style"))))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=sample, args=c) for c in cases + [(1, [6, 7, 8])]]
    for t in threads:
        t.start()
    try:
        for k in range(16):
            samplers[k % 2].set_adapters({"style": 1.0} if k % 2 == 0 else None)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert not torn, f"{len(torn)} results were neither the base's nor the adapter's, e.g. {torn[:3]}"
    assert seen == {"base", "style"}, seen
