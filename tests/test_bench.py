"""The logic of ``gpuce bench``: byte accounting, the check, peer skipping, the JSON schema,
the table, the plot and the command line on tiny sizes. No timing thresholds."""
import json

import numpy as np
import pytest

from gpuce import bench, bench_core as core, bench_peers as peers
from gpuce.cli import main as cli_main

# ---- byte accounting -------------------------------------------------------------------


def test_op_bytes():
    n, c = 1000, 32000
    assert core.op_bytes("softmax", n, c, 4) == 2 * n * c * 4
    assert core.op_bytes("log_softmax", n, c, 2) == 2 * n * c * 2
    assert core.op_bytes("ce_fwd", n, c, 4) == n * c * 4 + n * 8
    assert core.op_bytes("ce_fwd_bwd", n, c, 2) == 2 * n * c * 2 + n * 8
    assert core.copy_bytes(n, c, 4) == 2 * n * c * 4
    with pytest.raises(ValueError):
        core.op_bytes("matmul", n, c, 4)


def test_gbps_and_sizes():
    assert core.gbps(2e9, 1000.0) == pytest.approx(2.0)
    assert core.rows_for(1000, 4, 64 * core.MiB) == 64 * core.MiB // 4000
    assert core.rows_for(262144, 2, 1024) == 1  # never zero rows
    assert core.rotation_count(10 * core.MiB, 100 * core.MiB) == 10
    assert core.rotation_count(200 * core.MiB, 100 * core.MiB) == 1
    assert core.rotation_count(1, 100 * core.MiB) == core.MAX_ROTATION


def test_case_bytes_match_accounting():
    case = core.make_case(core.CpuDevice(), "bfloat16", 8, 16, rotate_bytes=4096)
    assert case.k == core.rotation_count(8 * 16 * 2 + 8 * 8, 4096)
    assert len(case.xs) == len(case.ts) == case.k
    assert all(x is not case.xs[0] and np.array_equal(x.view(np.uint16), case.xs[0].view(np.uint16))
               for x in case.xs[1:])
    assert case.bytes("ce_fwd_bwd") == core.op_bytes("ce_fwd_bwd", 8, 16, 2)
    assert str(case.xs[0].dtype) == "bfloat16" and case.ts[0].dtype == np.int64


def test_dtype_names():
    assert core.canonical_dtype("bf16") == "bfloat16"
    assert core.canonical_dtype("FP32") == "float32"
    with pytest.raises(ValueError):
        core.canonical_dtype("int8")


# ---- the check -------------------------------------------------------------------------


def test_row_blocks_cover_all_rows_or_spread():
    n, c = 10_000, 1000
    full = core.row_blocks(n, c, full=True)
    assert full[0][0] == 0 and full[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(full, full[1:]))
    some = core.row_blocks(n, c, full=False)
    assert some[0][0] == 0 and some[-1][1] == n
    assert sum(r1 - r0 for r0, r1 in some) < n
    assert core.row_blocks(1, 5, full=False) == [(0, 1)]


def _numpy_result(op, case):
    impl = peers.Numpy()
    return impl.setup(op, case).run(0)


@pytest.mark.parametrize("op", core.OPS)
def test_check_accepts_right_and_rejects_wrong(op):
    case = core.make_case(core.CpuDevice(), "float32", 64, 50, rotate_bytes=0)
    good = _numpy_result(op, case)
    assert core.check_result(op, case, good, full=True, strict_loss=False).ok
    if op == "ce_fwd":
        bad = good * np.float32(1.01)
    elif op == "ce_fwd_bwd":
        loss, grad = good
        grad = grad.copy()
        grad[37, 3] += np.abs(grad).max()  # one wrong element in one row
        bad = (loss, grad)
    else:
        bad = good.copy()
        bad[-1] = bad[0]
    chk = core.check_result(op, case, bad, full=True, strict_loss=False)
    assert not chk.ok and chk.reason


def test_check_sees_wrong_dtype_and_shape_for_gpuce():
    case = core.make_case(core.CpuDevice(), "float32", 16, 8, rotate_bytes=0)
    good = _numpy_result("softmax", case)
    assert not core.check_result("softmax", case, good.astype(np.float64), True, True).ok
    assert not core.check_result("softmax", case, good[:, :4], True, True).ok
    nan = good.copy()
    nan[3, 3] = np.nan
    assert not core.check_result("softmax", case, nan, True, True).ok


# ---- the run, with fake implementations ------------------------------------------------


def _cfg(**kw):
    args = bench.build_parser().parse_args(["--tiny", "--device", "cpu"])
    cfg = bench.config_from_args(args)
    cfg.update(kw)
    return cfg


class Missing(peers.Impl):
    name, label, note = "missing", "missing", "a peer that is not installed"

    def available(self, device):
        return "missing is not installed"


class NoBf16(peers.Numpy):
    name, label = "nobf16", "nobf16"


class Raises(peers.Impl):
    name, label = "raises", "raises"

    def setup(self, op, case):
        raise RuntimeError("this peer cannot do that")


class WrongGpuce(peers.Impl):
    """Pretends to be gpuce and is off by 1%: it must be reported wrong and never timed."""
    name, label, is_gpuce = "gpuce_wrong", "gpuce(wrong)", True
    ops = ("softmax",)

    def setup(self, op, case):
        run = peers.Numpy().setup(op, case).run

        def wrong(i):
            self.calls += 1
            return run(i) * np.float32(1.01)
        self.calls = 0
        return peers.Prepared(wrong)


def test_missing_and_failing_peers_are_skipped_with_reasons():
    wrong = WrongGpuce()
    impls = [peers.Numpy(), Missing(), NoBf16(), Raises(), wrong]
    doc = bench.run(_cfg(dtypes=["float32", "bfloat16"], classes=[16], ops=["softmax"]),
                    impls=impls, progress=False)
    skipped = {(s["impl"], s["dtype"]): s["reason"] for s in doc["skipped"]}
    assert skipped[("missing", None)] == "missing is not installed"
    assert "bfloat16" in skipped[("nobf16", "bfloat16")]
    assert "this peer cannot do that" in skipped[("raises", "float32")]
    assert not any(r["impl"] in ("missing", "raises") for r in doc["results"])
    ran = {(r["impl"], r["dtype"]) for r in doc["results"]}
    assert ("numpy", "float32") in ran and ("nobf16", "float32") in ran
    assert ("nobf16", "bfloat16") not in ran
    bad = [r for r in doc["results"] if r["impl"] == "gpuce_wrong"]
    assert bad and all(not r["checked"] and r["ms"] is None and r["gbps"] is None
                       and r["error"].startswith("wrong result") for r in bad)
    assert wrong.calls == 1  # checked once, then never timed
    assert bench.gpuce_failed(doc)
    text = bench.format_report(doc)
    assert "WRONG" in text and "missing is not installed" in text


def test_select_impls():
    impls = peers.registry("cpu")
    assert [i.name for i in bench.select_impls({"impls": ["numpy"], "device": "cpu"}, impls)] == ["numpy"]
    left = bench.select_impls({"skip_impls": ["jax", "scipy"], "device": "cpu"}, impls)
    assert "jax" not in [i.name for i in left] and "gpuce" in [i.name for i in left]
    with pytest.raises(SystemExit):
        bench.select_impls({"impls": ["nope"], "device": "cpu"}, impls)


def test_registry_names_are_unique():
    for kind in ("cpu", "cuda"):
        names = [i.name for i in peers.registry(kind)]
        assert len(names) == len(set(names)) and names[:2] == ["gpuce", "gpuce_out"]


def test_gpu_timer_uses_events():
    class FakeEvent:
        clock = [0.0]

        def record(self):
            FakeEvent.clock[0] += 1.5
            self.t = FakeEvent.clock[0]

    class FakeDevice:
        kind = "cuda"
        syncs = 0

        def event(self):
            return FakeEvent()

        def elapsed_ms(self, s, e):
            return e.t - s.t

        def synchronize(self):
            self.syncs += 1

    seen = []
    timer = core.GpuTimer(FakeDevice(), warmup=2, repeats=7, min_repeats=3, budget_s=100.0)
    timing = timer.time(lambda i: seen.append(i), pre=None, k=3)
    assert timing.times_ms == [1.5] * 7 and timing.median == 1.5
    assert seen[:3] == [0, 1, 0]       # warm-up, then one estimating run
    assert seen[3:] == [0, 1, 2, 0, 1, 2, 0]  # the timed runs rotate through the buffers


def test_cpu_timer_rotates_and_calls_pre():
    order = []
    timer = core.CpuTimer(warmup=1, repeats=5, min_repeats=5, budget_s=0.0)
    timing = timer.time(lambda i: order.append(("run", i)), pre=lambda i: order.append(("pre", i)), k=2)
    assert len(timing.times_ms) == 5
    assert order[:2] == [("pre", 0), ("run", 0)]
    assert [x for x in order[2:] if x[0] == "run"] == [("run", i % 2) for i in range(5)]
    assert all(t >= 0 for t in timing.times_ms)
    s = timing.summary()
    assert s["ms_min"] <= s["ms_q1"] <= s["ms"] <= s["ms_q3"] and s["runs"] == 5


# ---- a real tiny run: JSON, table, plot, command line ----------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {k: str(d / f"out.{k}") for k in ("json", "png", "md")}
    rc = cli_main(["bench", "--tiny", "--device", "cpu", "--no-progress", "--skip-impls", "jax",
                   "--json", paths["json"], "--plot", paths["png"], "--markdown", paths["md"]])
    return rc, paths


def test_cli_tiny_run(tiny_run, capsys):
    rc, paths = tiny_run
    assert rc == 0
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(paths["md"]).read()
    assert "| op | dtype | N x C |" in md and "gpuce" in md


def test_json_schema(tiny_run):
    doc = json.load(open(tiny_run[1]["json"]))
    assert doc["schema"] == bench.SCHEMA
    assert set(doc) >= {"machine", "config", "impls", "cases", "results", "skipped", "created"}
    m = doc["machine"]
    for key in ("cpu", "cores_logical", "cores_usable", "versions", "gpu", "os", "python"):
        assert key in m
    assert m["versions"]["numpy"] == np.__version__
    cfg = doc["config"]
    assert cfg["device"] == "cpu" and cfg["floor"] == "np.copyto"
    assert isinstance(cfg["threads"]["numba"], int)
    assert {s["impl"] for s in doc["skipped"]} >= {"gpuce_out"}  # gpuce(out=) has no ce_fwd
    for s in doc["skipped"]:
        assert set(s) == {"impl", "reason", "op", "dtype"} and s["reason"]
    results = doc["results"]
    ops = {r["op"] for r in results}
    assert ops == set(core.OPS)
    assert {r["impl"] for r in results} >= {"gpuce", "gpuce_out", "numpy"}
    for r in results:
        for key in ("op", "dtype", "n", "c", "bytes", "impl", "ms", "gbps", "pct_floor",
                    "floor_ms", "checked", "max_err", "loss_err", "rows_checked", "error"):
            assert key in r
        assert r["checked"], r
        assert r["bytes"] == core.op_bytes(r["op"], r["n"], r["c"], core.ITEMSIZE[r["dtype"]])
        assert r["gbps"] == pytest.approx(r["bytes"] / r["ms"] / 1e6)
        assert r["ms_min"] <= r["ms"] and r["runs"] >= 1
        case = next(c for c in doc["cases"] if (c["dtype"], c["n"], c["c"]) == (r["dtype"], r["n"], r["c"]))
        assert r["pct_floor"] == pytest.approx(100 * r["gbps"] / case["floor_gbps"])
        assert r["floor_ms"] == pytest.approx(r["bytes"] / case["floor_gbps"] / 1e6)
        if r["impl"].startswith("gpuce"):
            assert r["rows_checked"] == r["n"] or r["op"] == "ce_fwd"
    for case in doc["cases"]:
        assert case["floor_gbps"] == pytest.approx(
            core.copy_bytes(case["n"], case["c"], core.ITEMSIZE[case["dtype"]]) / case["copy_ms"] / 1e6)
        assert case["rotation"] >= 1


def test_load_rerenders(tiny_run, tmp_path, capsys):
    png = tmp_path / "again.png"
    assert cli_main(["bench", "--load", tiny_run[1]["json"], "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "vs best peer" in out and png.exists()


def test_table_columns(tiny_run):
    doc = json.load(open(tiny_run[1]["json"]))
    head, body = bench.table_rows(doc, "gbps")
    assert head[:3] == ["op", "dtype", "N x C"] and "gpuce" in head and "floor" in head
    assert len(body) == len({(r["op"], r["dtype"], r["n"], r["c"]) for r in doc["results"]})
    assert all(len(row) == len(head) for row in body)
    head, body = bench.table_rows(doc, "ms")
    assert "vs torch" in head and all(len(row) == len(head) for row in body)


def test_arguments():
    parse = bench.build_parser().parse_args
    cfg = bench.config_from_args(parse(["--device", "cpu", "--ops", "softmax,ce_fwd_bwd",
                                        "--dtypes", "bf16", "fp32", "--shapes", "4x10,2x3"]))
    assert cfg["ops"] == ["softmax", "ce_fwd_bwd"] and cfg["dtypes"] == ["bfloat16", "float32"]
    assert cfg["shapes"] == [[4, 10], [2, 3]]
    assert bench.plan_shapes(cfg, "float32") == [(4, 10), (2, 3)]
    quick = bench.config_from_args(parse(["--quick", "--device", "cpu"]))
    assert quick["quick"] and quick["classes"] == list(bench.QUICK_CLASSES)
    assert [c for n, c in bench.plan_shapes(quick, "float32")] == list(bench.QUICK_CLASSES)
    with pytest.raises(SystemExit):
        bench.config_from_args(parse(["--device", "cpu", "--ops", "matmul"]))
    with pytest.raises(SystemExit):
        bench.config_from_args(parse(["--device", "cpu", "--shapes", "4x"]))


def test_cuda_without_gpu_is_a_clear_error(capsys):
    if core.CudaDevice.available():
        pytest.skip("a GPU is present")
    assert cli_main(["bench", "--device", "cuda", "--tiny"]) == 2
    assert "no usable GPU" in capsys.readouterr().err


# ---- the GPU path, with CPU torch tensors standing in for CUDA ones ----------------------


class FakeCuda(core.CudaDevice):
    """CudaDevice's torch branch on CPU tensors; events read the host clock."""

    def __init__(self):
        import torch
        self.lib, self._torch, self._cupy, self._where = "torch", torch, None, "cpu"
        self.cache_bytes, self._scratch = 1 << 16, None
        self.syncs = 0

    def event(self):
        import time

        class Event:
            def record(self):
                self.t = time.perf_counter()
        return Event()

    def elapsed_ms(self, start, end):
        return (end.t - start.t) * 1e3

    def synchronize(self):
        self.syncs += 1

    def describe(self):
        return {"name": "fake GPU", "array_library": "torch"}


def test_gpu_path_with_torch_tensors():
    pytest.importorskip("torch")
    dev = FakeCuda()
    impls = [i for i in peers.registry("cuda") if i.name != "torch_compile"]
    ops = ["softmax", "ce_fwd", "ce_fwd_bwd"]
    cfg = _cfg(device="cuda", shapes=[[6, 10], [3, 200]], dtypes=["float32", "bfloat16"], ops=ops)
    doc = bench.run(cfg, impls=impls, progress=False, device=dev)
    assert doc["machine"]["gpu"]["name"] == "fake GPU"
    assert doc["config"]["floor"] == "device-to-device copy"
    ran = {(r["impl"], r["op"], r["dtype"]) for r in doc["results"]}
    for op in ops:
        for dt in ("float32", "bfloat16"):
            assert ("gpuce", op, dt) in ran and ("torch", op, dt) in ran
    assert all(r["checked"] for r in doc["results"]), [r["error"] for r in doc["results"]]
    import torch
    for r in doc["results"]:
        assert r["rows_checked"] > 0 or r["op"] == "ce_fwd"
    reasons = {s["impl"]: s["reason"] for s in doc["skipped"] if s["op"] is None}
    if not core._try_import("cupy"):
        assert "cupy" in reasons
    assert "liger" in reasons
    assert dev.syncs > 0 and isinstance(dev.upload(np.zeros(2, np.float32)), torch.Tensor)
    assert not bench.gpuce_failed(doc)
