"""C = 10 on the CPU: the short-row kernel against the copy floor and JAX, same run.

    python benchmarks/short_rows.py [--threads 1] [--clock cpu] [--n 1048576] [--out PATH]

Issue 8's two small-C targets: `ce_fwd` (loss only) at least as fast as JAX's jit of the
mean loss, and the fused loss+grad with `out=` within 3x the floor. The floor is the op's
bytes (read the logits, write the gradient, read the int64 targets) at the bandwidth of
np.copyto of the logits into a preallocated buffer, as in `gpuce bench`. Each figure is the
best of 9 runs. `--clock cpu` times this process's CPU time (all threads summed: use it
with --threads 1 on a loaded machine).
"""
import argparse
import sys
import time

import numpy as np


def best_ms(fn, clock, reps=9):
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--c", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    import numba

    import gpuce
    if args.threads:
        numba.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    n, c = args.n, args.c
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c), dtype=np.float32)
    y = rng.integers(0, c, n)
    out, copy = np.empty_like(x), np.empty_like(x)
    fns = {
        "np.copyto (floor's bandwidth)": lambda: np.copyto(copy, x),
        "gpuce ce_fwd": lambda: gpuce.cross_entropy(x, y),
        "gpuce ce_fwd_bwd, out=": lambda: gpuce.cross_entropy_with_grad(x, y, out=out),
        "gpuce ce_fwd_bwd": lambda: gpuce.cross_entropy_with_grad(x, y),
    }
    try:
        import jax
        import jax.numpy as jnp
        xj, yj = jax.device_put(x), jax.device_put(y.astype(np.int32))

        def loss(a, t):
            return jnp.mean(jax.nn.logsumexp(a, axis=-1)
                            - jnp.take_along_axis(a, t[:, None], axis=-1)[:, 0])
        fwd, fwd_bwd = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
        fns["jax ce_fwd"] = lambda: jax.block_until_ready(fwd(xj, yj))
        fns["jax ce_fwd_bwd"] = lambda: jax.block_until_ready(fwd_bwd(xj, yj))
    except ImportError:
        pass
    ms = {name: best_ms(fn, clock) for name, fn in fns.items()}
    floor_ms = ms["np.copyto (floor's bandwidth)"] * (2 * c * 4 + 8) / (2 * c * 4)
    lines = [f"## {n} × {c} fp32, numba threads {numba.get_num_threads()}, {args.clock} clock",
             "", "| call | ms | / floor |", "|---|---:|---:|"]
    lines += [f"| {name} | {t:.2f} | {t / floor_ms:.2f}× |" for name, t in ms.items()]
    if "jax ce_fwd" in ms:
        lines += ["", f"ce_fwd: JAX time / gpuce time = {ms['jax ce_fwd'] / ms['gpuce ce_fwd']:.2f} "
                  "(≥ 1: gpuce at least as fast)"]
    lines += [f"ce_fwd_bwd with out=: {ms['gpuce ce_fwd_bwd, out='] / floor_ms:.2f}× the floor "
              f"(floor {floor_ms:.2f} ms)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# C = 10 on the CPU (`python benchmarks/short_rows.py`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
