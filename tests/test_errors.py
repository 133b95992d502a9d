"""Bad input gives a clear error that names the argument; the raw ops raise, never crash.

The public functions and modules check their arguments in Python before choosing a backend,
so these run with or without the extension. The raw ``torch.ops.attnseg.*`` checks live in
C++ (TORCH_CHECK); those cases run in a child process, so that a segfault or abort in a kernel
shows up as a failed test naming the case instead of killing the whole pytest run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import attnseg
from torch import nn

from attnseg import ChannelAttention, DANetHead, PositionAttention, load_mmseg_dahead, load_official_danet_head


def raises_naming(exc_type, name):
    """pytest.raises(exc_type) whose message contains ``name`` as a whole word."""
    return pytest.raises(exc_type, match=rf"(?<![\w.]){re.escape(name)}(?!\w)")


def qkv(b=2, nq=5, nk=6, e=4, ev=3, dtype=torch.float32):
    return torch.randn(b, nq, e, dtype=dtype), torch.randn(b, nk, e, dtype=dtype), torch.randn(b, nk, ev, dtype=dtype)


GAMMA = torch.full((1,), 0.5)


# ---------------------------------------------------------------------------------------------
# attnseg.attention
# ---------------------------------------------------------------------------------------------


def _replace(index, tensor):
    q, k, v = qkv()
    args = [q, k, v]
    args[index] = tensor
    return args


ATTENTION_BAD_TENSORS = {
    # id: (args, exception type, argument the message must name)
    "q_rank_2": (_replace(0, torch.randn(5, 4)), ValueError, "q"),
    "k_rank_4": (_replace(1, torch.randn(2, 6, 4, 1)), ValueError, "k"),
    "v_rank_2": (_replace(2, torch.randn(6, 3)), ValueError, "v"),
    "q_int": (_replace(0, torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, "q"),
    "v_int": (_replace(2, torch.ones(2, 6, 3, dtype=torch.int32)), TypeError, "v"),
    "k_bool": (_replace(1, torch.ones(2, 6, 4, dtype=torch.bool)), TypeError, "k"),
    "k_complex": (_replace(1, torch.ones(2, 6, 4, dtype=torch.complex64)), TypeError, "k"),
    "k_mixed_dtype": (_replace(1, torch.randn(2, 6, 4, dtype=torch.float64)), TypeError, "k"),
    "v_mixed_dtype": (_replace(2, torch.randn(2, 6, 3, dtype=torch.float16)), TypeError, "v"),
    "k_other_device": (_replace(1, torch.empty(2, 6, 4, device="meta")), ValueError, "k"),
    "v_other_device": (_replace(2, torch.empty(2, 6, 3, device="meta")), ValueError, "v"),
    "k_batch_mismatch": (_replace(1, torch.randn(3, 6, 4)), ValueError, "k"),
    "v_batch_mismatch": (_replace(2, torch.randn(1, 6, 3)), ValueError, "v"),
    "k_E_mismatch": (_replace(1, torch.randn(2, 6, 5)), ValueError, "k"),
    "v_Nk_mismatch": (_replace(2, torch.randn(2, 7, 3)), ValueError, "v"),
    "q_zero_Nq": (_replace(0, torch.randn(2, 0, 4)), ValueError, "q"),
    "k_zero_Nk": (list(qkv(nk=0)), ValueError, "k"),
    "v_zero_Ev": (_replace(2, torch.randn(2, 6, 0)), ValueError, "v"),
    "q_zero_E": (list(qkv(e=0)), ValueError, "q"),
    "q_not_a_tensor": (_replace(0, [[1.0]]), TypeError, "q"),
    "k_sparse": (_replace(1, torch.randn(2, 6, 4).to_sparse()), ValueError, "k"),
}


@pytest.mark.parametrize("case", list(ATTENTION_BAD_TENSORS))
def test_attention_bad_tensor(case):
    args, exc_type, name = ATTENTION_BAD_TENSORS[case]
    with raises_naming(exc_type, name):
        attnseg.attention(*args)


BAD_SCALES = {
    # id: (scale, exception type)
    "tensor": (torch.tensor(1.0), TypeError),
    "str": ("1.0", TypeError),
    "None": (None, TypeError),
    "bool": (True, TypeError),
    "complex": (1j, TypeError),
    "nan": (float("nan"), ValueError),
    "inf": (float("inf"), ValueError),
    "-inf": (-float("inf"), ValueError),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_attention_bad_scale(case):
    scale, exc_type = BAD_SCALES[case]
    with raises_naming(exc_type, "scale"):
        attnseg.attention(*qkv(), scale)


@pytest.mark.parametrize("scale", [1, 0.125, -2, 0.0], ids=["int", "float", "negative_int", "zero"])
def test_attention_accepts_python_number_scale(scale):
    q, k, v = qkv(dtype=torch.float64)
    out = attnseg.attention(q, k, v, scale, backend="reference")
    torch.testing.assert_close(out, attnseg.reference.attention(q, k, v, float(scale)))


BAD_BACKENDS = ["cuda", "Native", "", None, 1, "fused"]


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_bad_backend_name(backend):
    with raises_naming(ValueError, "backend"):
        attnseg.attention(*qkv(), backend=backend)
    x = torch.randn(1, 8, 3, 3)
    with raises_naming(ValueError, "backend"):
        attnseg.channel_attention(x, GAMMA, backend=backend)
    with raises_naming(ValueError, "backend"):
        attnseg.position_attention(x, x[:, :2], x[:, :2], x, GAMMA, backend=backend)
    with raises_naming(ValueError, "backend"):
        attnseg.resolve_backend(backend, "cpu")
    with raises_naming(ValueError, "backend"):
        PositionAttention(8, backend=backend)
    with raises_naming(ValueError, "backend"):
        ChannelAttention(8, backend=backend)


# ---------------------------------------------------------------------------------------------
# attnseg.position_attention
# ---------------------------------------------------------------------------------------------


def _pam_args(**replace):
    x = torch.randn(2, 16, 3, 5)
    args = {"x": x, "query": torch.randn(2, 2, 3, 5), "key": torch.randn(2, 2, 3, 5),
            "value": torch.randn(2, 16, 3, 5), "gamma": GAMMA}
    args.update(replace)
    return args


PAM_BAD = {
    "x_rank_3": (_pam_args(x=torch.randn(2, 16, 15)), ValueError, "x"),
    "query_rank_3": (_pam_args(query=torch.randn(2, 2, 15)), ValueError, "query"),
    "x_int": (_pam_args(x=torch.ones(2, 16, 3, 5, dtype=torch.int64)), TypeError, "x"),
    "key_mixed_dtype": (_pam_args(key=torch.randn(2, 2, 3, 5, dtype=torch.float64)), TypeError, "key"),
    "value_other_device": (_pam_args(value=torch.empty(2, 16, 3, 5, device="meta")), ValueError, "value"),
    "key_E_mismatch": (_pam_args(key=torch.randn(2, 3, 3, 5)), ValueError, "key"),
    "value_C_mismatch": (_pam_args(value=torch.randn(2, 8, 3, 5)), ValueError, "value"),
    "query_spatial_mismatch": (_pam_args(query=torch.randn(2, 2, 5, 3)), ValueError, "query"),
    "value_batch_mismatch": (_pam_args(value=torch.randn(1, 16, 3, 5)), ValueError, "value"),
    "x_zero_N": (_pam_args(x=torch.randn(2, 16, 0, 5)), ValueError, "x"),
    "gamma_shape": (_pam_args(gamma=torch.zeros(2)), ValueError, "gamma"),
    "gamma_empty": (_pam_args(gamma=torch.zeros(0)), ValueError, "gamma"),
    "gamma_float": (_pam_args(gamma=0.5), TypeError, "gamma"),
    "gamma_other_device": (_pam_args(gamma=torch.zeros(1, device="meta")), ValueError, "gamma"),
}


@pytest.mark.parametrize("case", list(PAM_BAD))
def test_position_attention_bad_input(case):
    args, exc_type, name = PAM_BAD[case]
    with raises_naming(exc_type, name):
        attnseg.position_attention(**args)


# ---------------------------------------------------------------------------------------------
# attnseg.channel_attention
# ---------------------------------------------------------------------------------------------

CAM_BAD = {
    "x_rank_3": ((torch.randn(2, 8, 15), GAMMA), {}, ValueError, "x"),
    "x_int": ((torch.ones(2, 8, 3, 5, dtype=torch.int32), GAMMA), {}, TypeError, "x"),
    "x_zero_N": ((torch.randn(2, 8, 3, 0), GAMMA), {}, ValueError, "x"),
    "x_zero_C": ((torch.randn(2, 0, 3, 5), GAMMA), {}, ValueError, "x"),
    "gamma_shape": ((torch.randn(2, 8, 3, 5), torch.zeros(1, 2)), {}, ValueError, "gamma"),
    "gamma_none": ((torch.randn(2, 8, 3, 5), None), {}, TypeError, "gamma"),
    "gamma_other_device": ((torch.randn(2, 8, 3, 5), torch.zeros(1, device="meta")), {}, ValueError, "gamma"),
    "variant_unknown": ((torch.randn(2, 8, 3, 5), GAMMA), {"variant": "sagan"}, ValueError, "variant"),
    "variant_case": ((torch.randn(2, 8, 3, 5), GAMMA), {"variant": "Official"}, ValueError, "variant"),
    "variant_bool": ((torch.randn(2, 8, 3, 5), GAMMA), {"variant": True}, ValueError, "variant"),
}


@pytest.mark.parametrize("case", list(CAM_BAD))
def test_channel_attention_bad_input(case):
    args, kwargs, exc_type, name = CAM_BAD[case]
    with raises_naming(exc_type, name):
        attnseg.channel_attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


MODULE_BAD = {
    # id: (constructor call, arguments the ValueError must name)
    "pam_7_by_8": (lambda: PositionAttention(7, reduction=8), ("in_channels", "reduction")),
    "pam_key_channels_0": (lambda: PositionAttention(16, key_channels=0), ("key_channels",)),
    "pam_zero": (lambda: PositionAttention(0), ("in_channels",)),
    "pam_float": (lambda: PositionAttention(16.0), ("in_channels",)),
    "pam_reduction_0": (lambda: PositionAttention(16, reduction=0), ("reduction",)),
    "cam_zero": (lambda: ChannelAttention(0), ("in_channels",)),
    "cam_variant": (lambda: ChannelAttention(variant="softmax"), ("variant",)),
    "head_3": (lambda: DANetHead(3, 3), ("in_channels", "channels")),  # inter = 3 // 4 = 0
    "head_16": (lambda: DANetHead(16, 3), ("in_channels", "pam_channels")),  # PAM width 4 // 8 = 0
    "head_channels_0": (lambda: DANetHead(64, 3, channels=0), ("channels",)),
    "head_out_channels_0": (lambda: DANetHead(64, 0), ("out_channels",)),
    "head_alias_disagrees": (lambda: DANetHead(64, 3, num_classes=4), ("out_channels", "num_classes")),
    "convert_model_backend": (lambda: attnseg.convert_model(nn.Identity(), backend="cuda"), ("backend",)),
    "head_cam_variant": (lambda: DANetHead(64, 3, cam_variant="bogus"), ("variant",)),
}


@pytest.mark.parametrize("case", list(MODULE_BAD))
def test_module_bad_constructor_arguments(case):
    make, names = MODULE_BAD[case]
    with pytest.raises(ValueError) as info:
        make()
    for name in names:
        assert re.search(rf"\b{name}\b", str(info.value)), f"{name!r} not named in: {info.value}"


@pytest.mark.parametrize("module", [PositionAttention(16), ChannelAttention(16)], ids=["PositionAttention", "ChannelAttention"])
def test_module_wrong_channel_count(module):
    with raises_naming(ValueError, "x"):
        module(torch.randn(1, 8, 3, 3))


# ---------------------------------------------------------------------------------------------
# Raw torch.ops.attnseg.* with bad inputs: a Python exception (c10::Error -> RuntimeError),
# never a crash. Each case is a Python expression evaluated in a child process; ``r`` is
# torch.randn, ``ops`` is torch.ops.attnseg.
# ---------------------------------------------------------------------------------------------

F32, F64, F16, I32 = "torch.float32", "torch.float64", "torch.float16", "torch.int32"

# id: (expression, argument the message must name)
RAW_OP_MUST_RAISE = {
    "fwd_q_rank_2": ("ops.attention_fwd(r(5, 4), r(2, 6, 4), r(2, 6, 3), 1.0)", "q"),
    "fwd_v_rank_4": ("ops.attention_fwd(r(2, 5, 4), r(2, 6, 4), r(2, 6, 3, 1), 1.0)", "v"),
    "fwd_k_int": (f"ops.attention_fwd(r(2, 5, 4), torch.ones(2, 6, 4, dtype={I32}), r(2, 6, 3), 1.0)", "k"),
    "fwd_q_complex": ("ops.attention_fwd(r(2, 5, 4, dtype=torch.complex64), r(2, 6, 4), r(2, 6, 3), 1.0)", "q"),
    "fwd_v_dtype_mismatch": (f"ops.attention_fwd(r(2, 5, 4), r(2, 6, 4), r(2, 6, 3, dtype={F64}), 1.0)", "v"),
    "fwd_k_batch_mismatch": ("ops.attention_fwd(r(2, 5, 4), r(3, 6, 4), r(2, 6, 3), 1.0)", "k"),
    "fwd_k_E_mismatch": ("ops.attention_fwd(r(2, 5, 4), r(2, 6, 5), r(2, 6, 3), 1.0)", "k"),
    "fwd_v_Nk_mismatch": ("ops.attention_fwd(r(2, 5, 4), r(2, 6, 4), r(2, 7, 3), 1.0)", "v"),
    "bwd_grad_out_shape": ("ops.attention_bwd(r(2, 5, 4), None, r(2, 5, 4), r(2, 6, 4), r(2, 6, 3), r(2, 5, 3), r(2, 5), 1.0)", "grad_out"),
    "bwd_out_shape": ("ops.attention_bwd(r(2, 5, 3), None, r(2, 5, 4), r(2, 6, 4), r(2, 6, 3), r(2, 6, 3), r(2, 5), 1.0)", "out"),
    "bwd_lse_shape": ("ops.attention_bwd(r(2, 5, 3), None, r(2, 5, 4), r(2, 6, 4), r(2, 6, 3), r(2, 5, 3), r(2, 6), 1.0)", "lse"),
    "bwd_lse_rank": ("ops.attention_bwd(r(2, 5, 3), None, r(2, 5, 4), r(2, 6, 4), r(2, 6, 3), r(2, 5, 3), r(2, 5, 1), 1.0)", "lse"),
    "bwd_grad_lse_shape": ("ops.attention_bwd(r(2, 5, 3), r(2, 4), r(2, 5, 4), r(2, 6, 4), r(2, 6, 3), r(2, 5, 3), r(2, 5), 1.0)", "grad_lse"),
    "bwd_q_int": (f"ops.attention_bwd(r(2, 5, 3), None, torch.ones(2, 5, 4, dtype={I32}), r(2, 6, 4), r(2, 6, 3), r(2, 5, 3), r(2, 5), 1.0)", "q"),
    "bwd_k_E_mismatch": ("ops.attention_bwd(r(2, 5, 3), None, r(2, 5, 4), r(2, 6, 2), r(2, 6, 3), r(2, 5, 3), r(2, 5), 1.0)", "k"),
    "cam_fwd_x_rank_4": ("ops.channel_attention_fwd(r(2, 8, 3, 5), True)", "x"),
    "cam_fwd_x_rank_2": ("ops.channel_attention_fwd(r(8, 15), False)", "x"),
    "cam_fwd_x_int": (f"ops.channel_attention_fwd(torch.ones(2, 8, 15, dtype={I32}), True)", "x"),
    "cam_bwd_grad_y_shape": ("ops.channel_attention_bwd(r(2, 8, 14), r(2, 8, 15), r(2, 8, 8), True)", "grad_y"),
    "cam_bwd_attn_shape": ("ops.channel_attention_bwd(r(2, 8, 15), r(2, 8, 15), r(2, 9, 9), True)", "attn"),
    "cam_bwd_attn_rank": ("ops.channel_attention_bwd(r(2, 8, 15), r(2, 8, 15), r(2, 64), False)", "attn"),
    "cam_bwd_x_int": (f"ops.channel_attention_bwd(r(2, 8, 15), torch.ones(2, 8, 15, dtype={I32}), r(2, 8, 8), True)", "x"),
}

# Inputs the spec leaves open (empty sizes, saved tensors in another float dtype): either a clean
# result of the right shape or a Python exception, never a crash. id: (expression, shapes if it returns)
RAW_OP_MUST_NOT_CRASH = {
    "fwd_empty_batch": ("ops.attention_fwd(r(0, 5, 4), r(0, 6, 4), r(0, 6, 3), 1.0)", [[0, 5, 3], [0, 5]]),
    "fwd_zero_Nq": ("ops.attention_fwd(r(2, 0, 4), r(2, 6, 4), r(2, 6, 3), 1.0)", [[2, 0, 3], [2, 0]]),
    "fwd_zero_Nk": ("ops.attention_fwd(r(2, 5, 4), r(2, 0, 4), r(2, 0, 3), 1.0)", [[2, 5, 3], [2, 5]]),
    "fwd_zero_E": ("ops.attention_fwd(r(2, 5, 0), r(2, 6, 0), r(2, 6, 3), 1.0)", [[2, 5, 3], [2, 5]]),
    "fwd_zero_Ev": ("ops.attention_fwd(r(2, 5, 4), r(2, 6, 4), r(2, 6, 0), 1.0)", [[2, 5, 0], [2, 5]]),
    "bwd_empty_batch": ("ops.attention_bwd(r(0, 5, 3), None, r(0, 5, 4), r(0, 6, 4), r(0, 6, 3), r(0, 5, 3), r(0, 5), 1.0)",
                        [[0, 5, 4], [0, 6, 4], [0, 6, 3]]),
    "bwd_grad_out_fp64": (f"ops.attention_bwd(r(2, 5, 3, dtype={F64}), None, r(2, 5, 4), r(2, 6, 4), r(2, 6, 3), r(2, 5, 3), r(2, 5), 1.0)",
                          [[2, 5, 4], [2, 6, 4], [2, 6, 3]]),
    "bwd_lse_dtype_half": (f"ops.attention_bwd(r(2, 5, 3), None, r(2, 5, 4), r(2, 6, 4), r(2, 6, 3), r(2, 5, 3), r(2, 5, dtype={F16}), 1.0)",
                           [[2, 5, 4], [2, 6, 4], [2, 6, 3]]),
    "cam_bwd_attn_dtype_half": (f"ops.channel_attention_bwd(r(2, 8, 15), r(2, 8, 15), r(2, 8, 8, dtype={F16}), True)", [[2, 8, 15]]),
    "cam_fwd_empty_batch": ("ops.channel_attention_fwd(r(0, 8, 15), True)", [[0, 8, 15], [0, 8, 8]]),
    "cam_fwd_zero_C": ("ops.channel_attention_fwd(r(2, 0, 15), True)", [[2, 0, 15], [2, 0, 0]]),
    "cam_fwd_zero_N": ("ops.channel_attention_fwd(r(2, 8, 0), False)", [[2, 8, 0], [2, 8, 8]]),
}

_CHILD = r"""
import json, os, sys
os.environ["ATTNSEG_QUIET"] = "1"
import torch, attnseg
if not attnseg.native_available():
    print("NATIVE_MISSING", attnseg.native_unavailable_reason(), flush=True)
    sys.exit(3)
ns = {"torch": torch, "ops": torch.ops.attnseg, "r": torch.randn}
for name, expr in json.loads(sys.stdin.read()):
    print("START " + name, flush=True)
    try:
        result = eval(expr, ns)
    except BaseException as exc:
        record = {"raised": type(exc).__name__, "runtime_error": isinstance(exc, RuntimeError), "message": str(exc)[:4000]}
    else:
        result = result if isinstance(result, (tuple, list)) else (result,)
        record = {"raised": None, "shapes": [list(t.shape) for t in result]}
    record["name"] = name
    print("RESULT " + json.dumps(record), flush=True)
"""


@pytest.fixture(scope="module")
def raw_op_results():
    """Evaluate every raw-op case in child processes; a case that kills its child is recorded as
    a crash (with the exit status) and the remaining cases run in a fresh child."""
    if not attnseg.native_available():
        return None
    pending = list({**{k: v[0] for k, v in RAW_OP_MUST_RAISE.items()},
                    **{k: v[0] for k, v in RAW_OP_MUST_NOT_CRASH.items()}}.items())
    results = {}
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(attnseg.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
    while pending:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(pending), capture_output=True,
                              text=True, env=env, cwd=repo_root, timeout=300)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line[len("START "):]
            elif line.startswith("RESULT "):
                record = json.loads(line[len("RESULT "):])
                results[record["name"]] = record
                started = None
        if proc.returncode == 3 and "NATIVE_MISSING" in proc.stdout:
            pytest.fail(f"the child process could not load the extension: {proc.stdout.strip()}")
        done = {name for name, _ in pending if name in results}
        if started is not None:  # the child died inside this case
            results[started] = {"crashed": proc.returncode, "stderr": proc.stderr[-2000:]}
            done.add(started)
        elif proc.returncode != 0:
            pytest.fail(f"the raw-op child failed outside any case (exit {proc.returncode}): {proc.stderr[-2000:]}")
        remaining = [(name, expr) for name, expr in pending if name not in done]
        if len(remaining) == len(pending):
            pytest.fail(f"no progress in the raw-op child (exit {proc.returncode}): {proc.stderr[-2000:]}")
        pending = remaining
    return results


def _result(raw_op_results, case):
    record = raw_op_results[case]
    assert "crashed" not in record, (
        f"{case}: the process died (exit status {record['crashed']}) instead of raising: {record['stderr']}"
    )
    return record


@pytest.mark.requires_native
@pytest.mark.parametrize("case", list(RAW_OP_MUST_RAISE))
def test_raw_op_bad_input_raises(raw_op_results, case):
    expr, name = RAW_OP_MUST_RAISE[case]
    record = _result(raw_op_results, case)
    assert record["raised"] is not None, f"{case}: {expr} returned tensors of shapes {record['shapes']} instead of raising"
    assert record["runtime_error"], f"{case}: raised {record['raised']}, expected a RuntimeError (TORCH_CHECK): {record['message']}"
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", record["message"]), (
        f"{case}: the message does not name {name!r}: {record['message']}"
    )


@pytest.mark.requires_native
@pytest.mark.parametrize("case", list(RAW_OP_MUST_NOT_CRASH))
def test_raw_op_edge_input_does_not_crash(raw_op_results, case):
    _, shapes = RAW_OP_MUST_NOT_CRASH[case]
    record = _result(raw_op_results, case)
    if record["raised"] is not None:
        assert record["runtime_error"] or record["raised"] in ("ValueError", "TypeError", "IndexError"), (
            f"{case}: raised {record['raised']}: {record['message']}"
        )
    else:
        assert record["shapes"] == shapes, f"{case}: returned shapes {record['shapes']}, expected {shapes}"


# ---------------------------------------------------------------------------------------------
# Loading parameters: a gamma (or any tensor) of the wrong shape is refused, naming it
# ---------------------------------------------------------------------------------------------


def _official_head_state(**override):
    head = DANetHead(64, 3)
    state = {"head." + k: v for k, v in head.state_dict().items()}
    state.update(override)
    return head, state


def _mmseg_head_state(**override):
    from attnseg.checkpoints import _mmseg_key_map

    head = DANetHead(64, 3)
    ours = head.state_dict()
    state, used = {}, set()
    for theirs, mine in _mmseg_key_map().items():  # one spelling per parameter (the map knows two)
        if mine in ours and mine not in used:
            state["decode_head." + theirs] = ours[mine]
            used.add(mine)
    state.update(override)
    return head, state


def _load_official(**override):
    from attnseg.checkpoints import load_official_danet_head

    head, state = _official_head_state(**override)
    return load_official_danet_head(head, state)


def _load_mmseg(**override):
    from attnseg.checkpoints import load_mmseg_dahead

    head, state = _mmseg_head_state(**override)
    return load_mmseg_dahead(head, state)


# id: (call, exception type, name the message must contain)
STATE_DICT_BAD = {
    "pam_gamma_shape": (lambda: PositionAttention(16).load_state_dict(
        {**PositionAttention(16).state_dict(), "gamma": torch.zeros(2)}), RuntimeError, "gamma"),
    "cam_gamma_shape": (lambda: ChannelAttention(16).load_state_dict({"gamma": torch.zeros(1, 1)}), RuntimeError,
                        "gamma"),
    "pam_missing_gamma": (lambda: PositionAttention(16).load_state_dict(
        {k: v for k, v in PositionAttention(16).state_dict().items() if k != "gamma"}), RuntimeError, "gamma"),
    "official_head_gamma_shape": (lambda: _load_official(**{"head.sa.gamma": torch.zeros(2)}), ValueError,
                                  "head.sa.gamma"),
    "official_head_missing_gamma": (lambda: _load_official(**{"head.sc.gamma": None}), TypeError, "head.sc.gamma"),
    "mmseg_head_gamma_shape": (lambda: _load_mmseg(**{"decode_head.pam.gamma.scale": torch.zeros(3)}), ValueError,
                               "decode_head.pam.gamma.scale"),
    "official_head_only_state_dict": (lambda: load_official_danet_head(DANetHead(64, 3), DANetHead(64, 3).state_dict()),
                                      ValueError, 'prefix=""'),
    "mmseg_head_only_state_dict": (lambda: load_mmseg_dahead(DANetHead(64, 3), {
        k[len("decode_head."):]: v for k, v in _mmseg_head_state()[1].items()}), ValueError, 'prefix=""'),
    "official_prefix_matches_nothing": (lambda: load_official_danet_head(DANetHead(64, 3), {"x.weight": torch.zeros(1)}),
                                        ValueError, "prefix"),
    "official_wrong_module_kind": (lambda: load_official_danet_head(nn.Conv2d(1, 1, 1), {}), TypeError,
                                   "DANetHead"),
    "mmseg_wrong_module_kind": (lambda: load_mmseg_dahead(PositionAttention(16), {}), TypeError, "DANetHead"),
    "mmseg_arguments_swapped": (lambda: load_mmseg_dahead({}, DANetHead(64, 3)), TypeError, "head"),
}


@pytest.mark.parametrize("case", list(STATE_DICT_BAD))
def test_state_dict_bad_parameter(case):
    call, exc_type, name = STATE_DICT_BAD[case]
    with raises_naming(exc_type, name):
        call()


# ---------------------------------------------------------------------------------------------
# Fuzzing the op entry points (tests/fuzz_ops.py): random ranks, sizes (zero included) and
# dtypes; every call raises a Python exception or returns the correct result, in a child
# process so that a crash fails this test with the call that caused it.
# ---------------------------------------------------------------------------------------------

FUZZ_CALLS = 400


@pytest.mark.requires_native
@pytest.mark.parametrize("where", ["native", pytest.param("emulated", marks=pytest.mark.emulator)])
def test_fuzzed_op_entry_points(where):
    if where == "emulated":
        import emulator

        emulator.load()  # build (or reuse) the emulator here, not inside the child's time budget
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(attnseg.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_ops.py")
    proc = subprocess.run([sys.executable, script, where, str(FUZZ_CALLS), "0"], capture_output=True, text=True,
                          env=env, cwd=repo_root, timeout=900)
    lines = proc.stdout.splitlines()
    summary = [line for line in lines if line.startswith("SUMMARY ")]
    if proc.returncode != 0 or not summary:
        last = next((line for line in reversed(lines) if line.startswith("START ")), "before the first call")
        pytest.fail(f"the fuzz child died (exit {proc.returncode}) at {last}:\n{proc.stderr[-3000:]}")
    result = json.loads(summary[0][len("SUMMARY "):])
    assert result["calls"] == FUZZ_CALLS
    assert not result["problems"], "\n".join(result["problems"])
    # both kinds of call were exercised
    assert result["raised"] > FUZZ_CALLS // 4 and result["correct"] > FUZZ_CALLS // 4, result


@pytest.mark.requires_native
def test_bad_input_table_is_current():
    """docs/bad_input.md lists every case above with the message the code gives today."""
    import bad_input_table

    with open(bad_input_table.DOC, encoding="utf-8") as f:
        committed = f.read()
    assert committed == bad_input_table.table(), (
        "docs/bad_input.md is out of date; regenerate it with `python tests/bad_input_table.py`"
    )
