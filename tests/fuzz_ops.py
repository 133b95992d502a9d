"""Fuzzing of the op entry points: random ranks, sizes (zero included) and dtypes for every
argument of the four ops, native (torch.ops.attnseg) and CUDA-through-the-emulator, each call
either raising a Python exception or returning the correct result. Run by
tests/test_errors.py::test_fuzzed_op_entry_points in a child process (a crash then fails the
test with the case that caused it); by hand: ``python tests/fuzz_ops.py [native|emulated] [count] [seed]``.

Prints one ``START <i> <description>`` line before each call and a JSON summary at the end.
"""

from __future__ import annotations

import json
import os
import random
import sys

os.environ.setdefault("ATTNSEG_QUIET", "1")

import torch  # noqa: E402

import attnseg  # noqa: E402, F401  (loads the ops)
from attnseg import reference  # noqa: E402

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OTHERS = (torch.int32, torch.int64, torch.bool, torch.complex64)
TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4, torch.float64: 1e-9}


class Fuzzer:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def dtype(self, base):
        """Mostly ``base``; sometimes another float or a non-float type."""
        roll = self.rng.random()
        if roll < 0.8:
            return base
        return self.rng.choice(FLOATS if roll < 0.9 else OTHERS)

    def size(self):
        return self.rng.choice((0, 1, 1, 2, 3, 5, 7, 33, 40))

    def shape(self, good):
        """Mostly ``good``; sometimes one size changed, a dimension dropped or added."""
        roll = self.rng.random()
        shape = list(good)
        if roll < 0.75:
            return shape
        if roll < 0.9 and shape:
            shape[self.rng.randrange(len(shape))] = self.size()
        elif roll < 0.95 and shape:
            shape.pop(self.rng.randrange(len(shape)))
        else:
            shape.insert(self.rng.randrange(len(shape) + 1), self.rng.choice((1, 2)))
        return shape

    def tensor(self, shape, dtype):
        t = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        if dtype.is_complex:
            return t.to(dtype)
        if dtype == torch.bool:
            return t > 0
        if not dtype.is_floating_point:
            return (t * 3).round().to(dtype)
        t = t.to(dtype)
        if self.rng.random() < 0.2 and t.dim() == 3:  # a transposed (channel-first) view
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        return t


def _close(a, b, dtype):
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    tol = TOL.get(dtype, 1e-4)
    return bool(torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True))


def _valid_attention(q, k, v):
    return (all(t.dim() == 3 and t.dtype in FLOATS for t in (q, k, v)) and q.dtype == k.dtype == v.dtype
            and q.shape[0] == k.shape[0] == v.shape[0] and q.shape[2] == k.shape[2] and k.shape[1] == v.shape[1])


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def cases(fz: Fuzzer, count: int):
    """Yield (description, call, check) triples; check(result) -> error text or None."""
    for i in range(count):
        op = fz.rng.choice(("attention_fwd", "attention_bwd", "channel_attention_fwd", "channel_attention_bwd"))
        base = fz.rng.choice(FLOATS)
        if op.startswith("attention"):
            b, nq, nk, e, ev = (fz.size() for _ in range(5))
            q = fz.tensor(fz.shape([b, nq, e]), fz.dtype(base))
            k = fz.tensor(fz.shape([b, nk, e]), fz.dtype(base))
            v = fz.tensor(fz.shape([b, nk, ev]), fz.dtype(base))
            scale = fz.rng.choice((0.0, 0.3, 1.0))
            desc = f"{op} q{tuple(q.shape)}:{q.dtype} k{tuple(k.shape)}:{k.dtype} v{tuple(v.shape)}:{v.dtype}"
            valid = _valid_attention(q, k, v)
            if valid:
                ref = reference.attention_with_lse(q.double(), k.double(), v.double(), scale)
            if op == "attention_fwd":
                def check(result, q=q, valid=valid, ref=ref if valid else None):
                    if not valid:
                        return "returned a result for invalid arguments"
                    out, lse = result
                    if not (_close(out, ref[0], q.dtype) and _close(lse, ref[1], q.dtype)):
                        return "wrong result"
                    return None
                yield desc, (op, (q, k, v, scale)), check
            else:
                nq_, ev_ = (q.shape[1], v.shape[2]) if valid else (nq, ev)
                grad_out = fz.tensor(fz.shape([b, nq_, ev_]), fz.dtype(base))
                if valid:
                    out, lse = ref[0].to(q.dtype), ref[1].to(_lse_dtype(q.dtype))
                else:
                    out = fz.tensor([b, nq, ev], base)
                    lse = fz.tensor([b, nq], _lse_dtype(base))
                grad_lse = None if fz.rng.random() < 0.5 else fz.tensor(fz.shape(list(lse.shape)), torch.float32)
                desc += f" grad_out{tuple(grad_out.shape)}:{grad_out.dtype} grad_lse {None if grad_lse is None else tuple(grad_lse.shape)}"
                ok_grads = valid and grad_out.dim() == 3 and tuple(grad_out.shape) == tuple(out.shape) and \
                    grad_out.dtype in FLOATS and (grad_lse is None or tuple(grad_lse.shape) == tuple(lse.shape))

                def check(result, q=q, k=k, v=v, scale=scale, grad_out=grad_out, grad_lse=grad_lse, ok=ok_grads):
                    if not ok:
                        return "returned a result for invalid arguments"
                    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
                    o, l_ = reference.attention_with_lse(qd, kd, vd, scale)
                    gl = torch.zeros_like(l_) if grad_lse is None else grad_lse.double()
                    expected = torch.autograd.grad((o, l_), (qd, kd, vd), (grad_out.double(), gl), allow_unused=True)
                    for got, want in zip(result, expected):
                        want = torch.zeros_like(got, dtype=torch.float64) if want is None else want
                        if not _close(got, want, q.dtype):
                            return "wrong gradient"
                    return None
                yield desc, (op, (grad_out, grad_lse, q, k, v, out, lse, scale)), check
        else:
            b, c, n = fz.size(), fz.size(), fz.size()
            x = fz.tensor(fz.shape([b, c, n]), fz.dtype(base))
            official = fz.rng.random() < 0.5
            valid = x.dim() == 3 and x.dtype in FLOATS
            desc = f"{op} x{tuple(x.shape)}:{x.dtype} official={official}"

            def cam_ref(x, official):
                xd = x.double()
                energy = xd @ xd.transpose(1, 2)
                a = torch.softmax(-energy if official else energy, -1)
                return a @ xd, a

            if op == "channel_attention_fwd":
                def check(result, x=x, official=official, valid=valid):
                    if not valid:
                        return "returned a result for invalid arguments"
                    y, a = cam_ref(x, official)
                    return None if _close(result[0], y, x.dtype) and _close(result[1], a, x.dtype) else "wrong result"
                yield desc, (op, (x, official)), check
            else:
                grad_y = fz.tensor(fz.shape(list(x.shape)), fz.dtype(base))
                if valid:
                    attn = cam_ref(x, official)[1].to(_lse_dtype(x.dtype))
                else:
                    attn = fz.tensor([b, c, c], torch.float32)
                if fz.rng.random() < 0.15:  # a saved attn of the wrong shape
                    attn = fz.tensor([attn.shape[0], attn.shape[1] + 1, attn.shape[2]], attn.dtype)
                desc += f" grad_y{tuple(grad_y.shape)}:{grad_y.dtype} attn{tuple(attn.shape)}:{attn.dtype}"
                ok = valid and tuple(grad_y.shape) == tuple(x.shape) and grad_y.dtype in FLOATS and \
                    tuple(attn.shape) == (x.shape[0], x.shape[1], x.shape[1]) and attn.dtype == _lse_dtype(x.dtype)

                def check(result, x=x, official=official, grad_y=grad_y, attn=attn, ok=ok):
                    if not ok:
                        return "returned a result for invalid arguments"
                    xd = x.double().requires_grad_()
                    energy = xd @ xd.transpose(1, 2)
                    y = torch.softmax(-energy if official else energy, -1) @ xd
                    (want,) = torch.autograd.grad(y, xd, grad_y.double())
                    return None if _close(result, want, x.dtype) else "wrong gradient"
                yield desc, (op, (grad_y, x, attn, official)), check


def main() -> int:
    where = sys.argv[1] if len(sys.argv) > 1 else "native"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    if where == "native":
        ops = torch.ops.attnseg
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import emulator

        ops = emulator.load()
    summary = {"calls": 0, "raised": 0, "correct": 0, "problems": []}
    for i, (desc, (name, args), check) in enumerate(cases(Fuzzer(seed), count)):
        print(f"START {i} {desc}", flush=True)
        summary["calls"] += 1
        try:
            result = getattr(ops, name)(*args)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            summary["raised"] += 1
            if not str(exc).strip():
                summary["problems"].append(f"{desc}: {type(exc).__name__} with an empty message")
            continue
        problem = check(result)
        if problem:
            summary["problems"].append(f"{desc}: {problem}")
        else:
            summary["correct"] += 1
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
