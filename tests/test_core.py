"""The compiled core edmrt._core: its exported constants against the Python definitions, and the input checks
of its bindings (dtype, contiguity, alignment, size, shape, writeability and overlap, checked before a pointer is
touched)."""
import numpy as np
import pytest

import edmrt
from edmrt.kernels import philox, plan_table
from edmrt.kernels.table import COLUMNS, FIXED

_core = pytest.importorskip("edmrt._core", reason="the C++ core edmrt._core is not built")


def test_streams_equal_philox_py():
    assert _core.STREAMS == {"initial": philox.INITIAL_STREAM, "churn": philox.CHURN_STREAM,
                             "stage0": philox.STAGE0_STREAM}
    assert all(philox.stage_stream(s) == _core.STREAMS["stage0"] + s for s in range(20))


def test_table_columns_equal_table_py():
    assert _core.TABLE_COLUMNS == list(COLUMNS)
    assert _core.TABLE_FIXED_COLUMNS == FIXED


def _init_args(B=2, n=6, twice=False):
    table = plan_table(edmrt.plan("edm", edmrt.make_sigmas("karras", 3), S_churn=20.0)).numpy()
    nin = 2 * B if twice else B
    return dict(table=table, t0=80.0, n_init=0.0, seeds=np.array([3, 2 ** 40 + 1][:B], dtype=np.int64),
                x=np.full((B, n), np.nan, dtype=np.float32), x_eval=np.full((B, n), np.nan, dtype=np.float32),
                x_in=np.full((nin, n), np.nan, dtype=np.float32), sigma_in=np.full(nin, np.nan, dtype=np.float32),
                batch=B)


def test_init_state_draws_the_initial_stream_or_reads_a_read_only_x0():
    args = _init_args()
    _core.init_state(**args)
    z = np.empty((2, 6), dtype=np.float32)
    _core.randn(args["seeds"], _core.STREAMS["initial"], z, 2)
    np.testing.assert_array_equal(args["x"], np.float32(80.0) * z)
    x0 = np.arange(12, dtype=np.float32).reshape(2, 6)
    x0.setflags(write=False)  # an input: read, never written
    args = _init_args(twice=True)
    _core.init_state(**args, x0=x0)
    np.testing.assert_array_equal(args["x"], x0)
    np.testing.assert_array_equal(args["x_eval"], x0)
    c_in, c_noise = np.float32(args["table"][0, 0]), np.float32(args["table"][0, 1])
    np.testing.assert_array_equal(args["x_in"], np.concatenate([c_in * x0, c_in * x0]))
    np.testing.assert_array_equal(args["sigma_in"], np.full(4, c_noise, dtype=np.float32))


BAD_INIT = [
    (dict(x0=np.zeros((2, 6))), "x0 must have dtype float32"),
    (dict(x0=np.zeros((2, 12), dtype=np.float32)[:, ::2]), "x0 must be C-contiguous"),
    (dict(x0=np.zeros((2, 5), dtype=np.float32)), "x0 must have 12 elements"),
    (dict(seeds=np.zeros(2, dtype=np.int32)), "seeds must have dtype"),
    (dict(sigma_in=np.zeros(3, dtype=np.float32)), "sigma_in must have 2 elements"),
    (dict(x_in=np.zeros((3, 6), dtype=np.float32)), "x_in must have batch or 2 \\* batch samples"),
    (dict(batch=5), "x must hold batch \\* per_sample elements"),
    (dict(table=np.zeros((0, 13))), "table must be 2-D with at least one stage"),
    # Issue 11, item 2: a table narrower than FIXED + 1 columns was read past its end (c_noise of a (1, 1) table).
    (dict(table=np.ones((1, 1))), r"table must have 12 \+ K columns with 1 <= K <= 16, got shape \(1, 1\)"),
    (dict(table=np.ones((1, 12))), r"table must have 12 \+ K columns"),
    (dict(table=np.ones((1, 29))), r"table must have 12 \+ K columns"),
    (dict(table=np.ones(13)), "table must be 2-D"),
    (dict(table=np.ones((1, 13), dtype=np.float32)), "table must have dtype float64"),
    (dict(table=np.ones((13, 2)).T), "table must be C-contiguous"),
    (dict(t0=float("nan")), "t0 must be a finite number >= 0"),
    (dict(n_init=-1.0), "n_init must be a finite number >= 0"),
    (dict(x=np.zeros((3, 4), dtype=np.float32)), r"x must have shape \(batch, ...\) with batch = 2"),
    (dict(x=np.zeros((2, 0), dtype=np.float32)), "at least one element per sample"),
    (dict(x_eval=np.zeros((6, 2), dtype=np.float32)), r"x_eval must have shape \(2, 6\), got \(6, 2\)"),
    (dict(x_in=np.zeros((1, 12), dtype=np.float32)), r"x_in must have shape \(2, 6\), got \(1, 12\)"),
    (dict(x=np.frombuffer(bytearray(49), dtype=np.float32, count=12, offset=1).reshape(2, 6)),
     "x must be aligned"),
    (dict(seeds=np.zeros((1, 2), dtype=np.int64)), r"seeds must have shape \(2,\)"),
]


@pytest.mark.parametrize("change,match", BAD_INIT, ids=[m for _, m in BAD_INIT])
def test_init_state_rejects_bad_buffers(change, match):
    args = _init_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        _core.init_state(**args)


def test_init_state_rejects_overlapping_buffers():
    """Outputs may not overlap each other nor the inputs; x0 may be x itself, but no other part of it."""
    args = _init_args()
    args["x_eval"] = args["x"]
    with pytest.raises(ValueError, match="x_eval must not overlap x"):
        _core.init_state(**args)
    args = _init_args()
    buf = np.zeros((3, 6), dtype=np.float32)
    args["x"] = buf[:2]
    with pytest.raises(ValueError, match=r"x must not overlap x0 \(unless it is x itself\)"):
        _core.init_state(**args, x0=buf[1:])
    args = _init_args()
    args["x_in"] = args["x"].view(np.float32)
    with pytest.raises(ValueError, match="x_in must not overlap x"):
        _core.init_state(**args)


def test_init_state_rejects_read_only_outputs():
    args = _init_args()
    args["x"].setflags(write=False)
    with pytest.raises(ValueError, match="x must be writeable"):
        _core.init_state(**args)


def _step_args(B=2, n=6, K=2):
    plan = edmrt.plan("dpmpp_2m", edmrt.make_sigmas("karras", 4), edmrt.EDMPrecond())
    f = lambda *s, dtype=np.float32: np.zeros(s, dtype=dtype)  # noqa: E731
    return dict(table=plan_table(plan).numpy(), stage=1, x=f(B, n), x_eval=f(B, n), F=f(B, n), Y=f(K, B, n),
                x_in=f(B, n), sigma_in=f(B), seeds=f(B, dtype=np.int64), batch=B)


BAD_STEP = [
    (dict(stage=4), r"stage must be in \[0, 4\), got 4"),
    (dict(table=np.zeros((4, 12))), "table must have 12 \\+ K columns"),
    (dict(table=np.zeros((4, 14), dtype=np.float32)), "table must have dtype float64"),
    (dict(F=np.zeros((2, 6))), "F must have dtype float32"),
    (dict(F=np.zeros((4, 6), dtype=np.float32)), "F must have 12 elements"),
    (dict(F=np.zeros((2, 6), dtype=np.float32), guidance=2.0), "F must have 24 elements"),
    (dict(Y=np.zeros((1, 2, 6), dtype=np.float32)), "Y must have 24 elements"),
    (dict(x_eval=np.zeros((2, 12), dtype=np.float32)[:, ::2]), "x_eval must be C-contiguous"),
    (dict(x_in=np.zeros((3, 6), dtype=np.float32)), "x_in must have batch or 2 \\* batch samples"),
    (dict(sigma_in=np.zeros(4, dtype=np.float32)), "sigma_in must have 2 elements"),
    (dict(seeds=np.zeros(2, dtype=np.int32)), "seeds must have dtype"),
    (dict(batch=0), "batch must be >= 1"),
    (dict(table=np.ones((4, 1))), r"table must have 12 \+ K columns"),
    (dict(table=np.ones((4, 29))), r"table must have 12 \+ K columns"),
    (dict(table=np.ones((0, 14))), "table must be 2-D with at least one stage"),
    (dict(stage=2 ** 40), r"stage must be in \[0, 4\), got 1099511627776"),
    (dict(stage=-1), r"stage must be in \[0, 4\), got -1"),
    (dict(guidance=float("inf")), "guidance must be finite"),
    (dict(x=np.zeros((3, 4), dtype=np.float32)), r"x must have shape \(batch, ...\) with batch = 2"),
    (dict(x_eval=np.zeros((6, 2), dtype=np.float32)), r"x_eval must have shape \(2, 6\), got \(6, 2\)"),
    (dict(F=np.zeros((1, 12), dtype=np.float32)), r"F must have shape \(2, 6\), got \(1, 12\)"),
    (dict(Y=np.zeros((2, 12), dtype=np.float32)), r"Y must have shape \(2, 2, 6\), got \(2, 12\)"),
    (dict(x_in=np.zeros((4, 3), dtype=np.float32)), r"x_in must have shape \(2, 6\), got \(4, 3\)"),
    (dict(F=np.frombuffer(bytearray(49), dtype=np.float32, count=12, offset=1).reshape(2, 6)), "F must be aligned"),
]


@pytest.mark.parametrize("change,match", BAD_STEP, ids=[m for _, m in BAD_STEP])
def test_fused_step_rejects_bad_buffers(change, match):
    args = _step_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        _core.fused_step(**args)


def test_fused_step_rejects_read_only_outputs():
    args = _step_args()
    args["Y"].setflags(write=False)
    with pytest.raises(ValueError, match="Y must be writeable"):
        _core.fused_step(**args)


def test_fused_step_rejects_overlapping_buffers():
    """The element loop declares its pointers __restrict__: no output may overlap another buffer."""
    for out, other in [("x_eval", "x"), ("x_in", "x_eval"), ("Y", "x")]:
        args = _step_args()
        args[out] = args[other] if out != "Y" else np.zeros((2, 2, 6), dtype=np.float32)
        if out == "Y":
            args["x"] = args["Y"][0]
        with pytest.raises(ValueError, match=f"{out} must not overlap {other}"):
            _core.fused_step(**args)
    args = _step_args()
    args["F"] = args["x_in"]
    with pytest.raises(ValueError, match="x_in must not overlap F"):
        _core.fused_step(**args)


BAD_RANDN = [
    (dict(stream=-1), r"stream must be in \[0, 2\*\*32\), got -1"),
    (dict(stream=2 ** 32), r"stream must be in \[0, 2\*\*32\)"),
    (dict(batch=0), "batch must be >= 1"),
    (dict(batch=5), "out must hold batch \\* per_sample elements"),
    (dict(out=np.zeros((6, 2), dtype=np.float32)), r"out must have shape \(batch, ...\) with batch = 2"),
    (dict(out=np.zeros((2, 6))), "out must have dtype float32"),
    (dict(out=np.zeros((2, 12), dtype=np.float32)[:, ::2]), "out must be C-contiguous"),
    (dict(seeds=np.zeros(3, dtype=np.int64)), "seeds must have 2 elements"),
]


@pytest.mark.parametrize("change,match", BAD_RANDN, ids=[m for _, m in BAD_RANDN])
def test_randn_rejects_bad_arguments(change, match):
    args = dict(seeds=np.array([1, 2], dtype=np.int64), stream=3, out=np.zeros((2, 6), dtype=np.float32), batch=2)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        _core.randn(**args)
    args = dict(seeds=np.array([1, 2], dtype=np.int64), stream=3, out=np.zeros((2, 6), dtype=np.float32), batch=2)
    args["out"].setflags(write=False)
    with pytest.raises(ValueError, match="out must be writeable"):
        _core.randn(**args)


def test_philox_rejects_words_outside_uint32():
    assert _core.philox(0, 0, 0, 0, 0, 2 ** 32 - 1) == _core.philox(0, 0, 0, 0, 0, 0xFFFFFFFF)
    with pytest.raises(ValueError, match=r"c0 must be in \[0, 2\*\*32\), got -1"):
        _core.philox(-1, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"k1 must be in \[0, 2\*\*32\), got 4294967296"):
        _core.philox(0, 0, 0, 0, 0, 2 ** 32)


def test_bound_step_checks_its_buffers_once_and_f_at_every_call():
    """BoundStep (kernels.Stepper's C++ half): the buffers are checked when it is built, as fused_step checks them;
    a call checks the stage and F (dtype, shape, overlap with an output), and equals fused_step on copies."""
    args = _step_args()
    rng = np.random.default_rng(0)
    for k in ("x", "x_eval", "F", "Y"):
        args[k][...] = rng.standard_normal(args[k].shape)
    copy = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    bound = _core.BoundStep(*(args[k] for k in ("table", "x", "x_eval", "Y", "x_in", "sigma_in", "seeds")), 2)
    bound(1, args["F"])
    _core.fused_step(**copy)
    for k in ("x", "x_eval", "Y", "x_in", "sigma_in"):
        assert np.array_equal(args[k], copy[k]), k
    with pytest.raises(ValueError, match=r"stage must be in \[0, 4\), got 4"):
        bound(4, args["F"])
    with pytest.raises(ValueError, match="F must have dtype float32"):
        bound(0, args["F"].astype(np.float64))
    with pytest.raises(ValueError, match=r"F must have shape \(2, 6\), got \(6, 2\)"):
        bound(0, args["F"].reshape(6, 2))
    with pytest.raises(ValueError, match="x_in must not overlap F"):
        bound(0, args["x_in"])
    with pytest.raises(ValueError, match="x_eval must not overlap x"):
        _core.BoundStep(args["table"], args["x"], args["x"], args["Y"], args["x_in"], args["sigma_in"], args["seeds"], 2)
    with pytest.raises(ValueError, match="Y must have 24 elements, got 12"):
        _core.BoundStep(args["table"], args["x"], args["x_eval"], args["Y"][:1], args["x_in"], args["sigma_in"],
                        args["seeds"], 2)


def test_bound_step_keeps_its_buffers_alive():
    """The bound arrays are referenced by the object: dropping every other reference leaves the call valid."""
    import gc

    args = _step_args()
    names = ("table", "x", "x_eval", "Y", "x_in", "sigma_in", "seeds")
    bound = _core.BoundStep(*(args.pop(k) for k in names), 2)
    F = np.ones((2, 6), dtype=np.float32)
    gc.collect()
    for _ in range(3):
        bound(1, F)


def test_step_isa_names_the_instruction_set():
    assert _core.step_isa() in ("avx2", "baseline")
