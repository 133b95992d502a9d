"""Tests of the static kernel report (benchmarks/kernel_report.py): the SASS parser, loop finder
and classifier on a hand-written snippet, the FLOP and occupancy models against numbers worked
out by hand, and (slow-ish, needs nvcc) one real compile for sm_80."""

from __future__ import annotations

import shutil

import pytest

from helpers import load_benchmark

kr = load_benchmark("kernel_report")

# A kernel in cuobjdump's format: a prologue, a main loop (0x0040-0x0100) holding an inner
# load loop (0x0050-0x0070, a one-block self loop) and leaving through the `CALL.REL.NOINC` exit
# idiom, an out-of-line block (0x0150) that branches back into the loop without being dominated
# by its header (not a loop of its own), and the `BRA .` that pads every kernel.
SNIPPET = """
	code for sm_80
		Function : _Z6kernelv
	.headerflags	@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;   /* 0x00000a00ff017624 */
                                                                              /* 0x000fe400078e00ff */
        /*0010*/                   S2R R0, SR_TID.X ;                        /* 0x0000000000007919 */
        /*0020*/                   ISETP.NE.AND P1, PT, R0, RZ, PT ;
        /*0030*/               @P1 BRA 0x150 ;
        /*0040*/                   LDG.E.128 R4, [R2.64] ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R8], [R2.64] ;
        /*0060*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0070*/              @!P0 BRA 0x50 ;
        /*0080*/                   LDSM.16.M88.4 R12, [R8] ;
        /*0090*/                   HMMA.16816.F32 R16, R12, R14, R16 ;
        /*00a0*/                   HMMA.16816.F32 R20, R12, R15, R20 ;
        /*00b0*/                   FFMA R24, R24, R25, R26 ;
        /*00c0*/                   IMAD.WIDE R2, R0, 0x2, R2 ;
        /*00d0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00e0*/                   LDG.E.U16 R27, [R2.64] ;
        /*00f0*/               @P2 CALL.REL.NOINC 0x110 ;
        /*0100*/                   BRA 0x40 ;
        /*0110*/                   STG.E [R2.64], R16 ;
        /*0120*/                   EXIT ;
        /*0130*/                   NOP ;
        /*0140*/                   NOP ;
        /*0150*/                   FADD R4, R4, R5 ;
        /*0160*/                   BRA 0x40 ;
        /*0170*/                   BRA 0x170;
"""


def _code():
    functions = kr.parse_sass(SNIPPET)
    assert list(functions) == ["_Z6kernelv"]
    return functions["_Z6kernelv"]


def test_parser_reads_addresses_opcodes_and_guards():
    code = _code()
    assert len(code) == 24
    assert (code[3].address, code[3].opcode, code[3].guarded, code[3].branch_target) == (0x30, "BRA", True, 0x150)
    assert code[0].base == "IMAD" and not code[0].guarded
    assert code[15].base == "CALL" and code[15].branch_target == 0x110


def test_classifier():
    expected = {"HMMA.16816.F32": "tensor", "DMMA.884": "tensor", "FFMA": "fma", "HFMA2.MMA": "fma",
                "FADD": "fp", "MUFU.EX2": "fp", "LDSM.16.M88.4": "ldst", "LDGSTS.E.BYPASS.128": "ldst",
                "LDGDEPBAR": "ldst", "DEPBAR.LE": "ldst", "IMAD.WIDE": "int", "LEA.HI.X": "int",
                "ISETP.GE.AND": "int", "BAR.SYNC.DEFER_BLOCKING": "control", "SHFL.BFLY": "control",
                "S2R": "other"}
    assert {op: kr.classify(op) for op in expected} == expected
    assert kr.flops_per_instruction("HMMA.16816.F32") == 4096
    assert kr.flops_per_instruction("HMMA.1688.F32.TF32") == 2048
    assert kr.flops_per_instruction("DMMA.884") == 512
    assert kr.flops_per_instruction("FFMA") == 64


def test_loops_main_loop_and_load_widths():
    code = _code()
    loops = {lp.label: lp for lp in kr.find_loops(code)}
    # the inner self loop, and the main loop; not 0x150 -> 0x40 (0x40 does not dominate it),
    # not the padding `BRA .`
    assert set(loops) == {"0x0050-0x0070", "0x0040-0x0100"}
    main = kr.main_loop(code)
    assert main.label == "0x0040-0x0100" and main.blocks == 4  # 0x40, 0x50-0x70, 0x80-0xf0, 0x100
    assert [i.address for i in main.instructions] == list(range(0x40, 0x110, 0x10))
    counts = {cls: main.count(cls) for cls in kr.CLASSES}
    assert counts == {"tensor": 2, "fma": 1, "fp": 0, "ldst": 4, "int": 2, "control": 4, "other": 0}
    assert kr.nested_loops(main, code) == 1
    assert kr.load_widths(code) == {"LDG.128": 1, "LDG.16": 1, "LDGSTS.128": 1}


def test_flop_model_of_the_old_kernels_matches_issue_11():
    """Forward: S for each of the 8 64-wide Ev slices, 1.78x; backward: 1.89x (issue 11)."""
    tiles = _TILES
    shape = kr.SHAPES[0]
    n2 = shape.nq * shape.nk
    fwd = kr.old_attention_fwd(shape, tiles, 2)
    assert fwd.flops == 2 * n2 * (8 * 64 + 512)
    assert fwd.blocks == 288 * 8
    assert fwd.flops / kr.USEFUL["attention_fwd"][0](shape) == pytest.approx(16 / 9)
    bwd = sum(m(shape, tiles, 2).flops for m in (kr.old_attention_delta, kr.old_attention_dq, kr.old_attention_dkv))
    assert bwd == 2 * n2 * (640 + 640 + 8 * 128)
    assert bwd / kr.USEFUL["attention_bwd"][0](shape) == pytest.approx(2304 / 1216)
    # padding: a ragged N rounds up to the tiles
    ragged = kr.Shape(1, 100, 70, 64, 512, 512)
    assert kr.old_attention_fwd(ragged, tiles, 2).flops == 2 * 128 * 96 * 1024


def test_occupancy():
    sm80, sm90 = kr.ARCHS[80], kr.ARCHS[90]
    # 94 registers -> 96 x 32 = 3072 a warp -> 21 warps -> 5 blocks of 4 warps
    assert kr.occupancy(sm80, 128, 94, 30080) == kr.Occupancy(5, 20, "registers")
    # 48 KiB + 1 KiB reserved: 3 blocks in 164 KiB, 4 in 228 KiB
    assert kr.occupancy(sm80, 128, 32, 48 * 1024) == kr.Occupancy(3, 12, "smem")
    assert kr.occupancy(sm90, 128, 32, 48 * 1024).blocks == 4
    assert kr.occupancy(sm80, 1024, 32, 0) == kr.Occupancy(2, 64, "warps")
    assert kr.occupancy(sm80, 128, 32, 200 * 1024).blocks == 0  # does not fit a block


_TILES = {"rows": 32, "cols": 32, "chunk": 64, "threads": 128, "smem": 0}


def _row(dtype="fp16", opcodes=("HMMA.16816.F32", "LDSM.16.M88.4", "LDGSTS.E.BYPASS.128"), stack=0, entry=None):
    entry = entry or kr.KERNELS[0]
    lines = [f"/*{16 * k:04x}*/ {op} R0, R1 ;" for k, op in enumerate(opcodes)]
    lines.append(f"/*{16 * len(opcodes):04x}*/ @P0 BRA 0x0 ;")
    code = kr.parse_sass("Function : f\n" + "\n".join(lines))["f"]
    compiled = kr.Compiled(entry, dtype, 80, ok=True, registers=64, stack=stack, code=code)
    return kr.analyse(compiled, _TILES)


def test_checks():
    assert all(ok for ok, _ in _row().checks.values())
    failing = _row(opcodes=("HMMA.16816.F32", "LDS.U16"), stack=16).checks
    assert {name for name, (ok, _) in failing.items() if not ok} == {"no stack/spill", "LDSM", "LDGSTS"}
    fp32 = _row("fp32", opcodes=("FFMA", "FFMA", "IMAD", "LDS")).checks
    assert fp32["FFMA share"] == (True, "40%")  # 2 of 5 with the branch


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit) on PATH")
def test_compiles_one_kernel_for_sm80(tmp_path, monkeypatch):
    """attention_fwd<__half> through nvcc and cuobjdump, without torch headers."""
    cuobjdump = kr.tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("needs cuobjdump (CUDA toolkit or Triton's NVIDIA backend)")
    monkeypatch.setattr(kr, "BUILD_DIR", tmp_path)
    entry = next(e for e in kr.KERNELS if e.name == "attention_fwd")
    compiled = kr.compile_kernel(entry, "fp16", 80, shutil.which("nvcc"), cuobjdump, "test")
    assert compiled.ok, compiled.log
    assert "attention_fwd_kernel<__half>" in compiled.function
    assert 0 < compiled.registers <= 255
    constants = kr.probe_constants([entry], ["fp16"], shutil.which("nvcc"), "test")[("attention_fwd", "fp16")]
    assert constants["threads"] == 128 and constants["smem"] > 0
    row = kr.analyse(compiled, constants)
    assert row.loop is not None and row.counts["tensor"] > 0
    assert row.occupancy.blocks >= 1
    again = kr.compile_kernel(entry, "fp16", 80, shutil.which("nvcc"), cuobjdump, "test")
    assert again.cached and again.registers == compiled.registers


def test_only_enforced_rows_fail_the_check():
    import dataclasses

    failing = ("HMMA.16816.F32", "LDS.U16")  # no ldmatrix, no cp.async
    for enforced in (False, True):
        entry = dataclasses.replace(kr.KERNELS[0], enforced=enforced)  # attention_fwd, 1.78x the useful FLOPs
        failures, lines = [], []
        kr._cuda_sections(lines.append, [_row(opcodes=failing, entry=entry)], [80], ["fp16"], kr.SHAPES[:1], failures)
        text = "\n".join(lines)
        assert "LDSM no FAIL" in text and "<= 1.15 FAIL" in text  # printed either way
        if enforced:
            assert "[enforced]" in text
            assert any("LDSM" in f for f in failures) and any("issued/useful 1.78" in f for f in failures)
        else:
            assert failures == []


def test_time_model():
    """One HMMA among 8 instructions, one block per SM: the issue bound is 8 warp instructions per
    4096 FLOPs at 4 a clock per SM; the compute bound is the tensor peak; DRAM bytes / bandwidth."""
    gpu = kr.GPUS[0]
    row = _row(opcodes=("HMMA.16816.F32", "LDSM.16.M88.4", "LDGSTS.E.BYPASS.128", "IMAD", "IMAD", "IMAD", "IMAD"))
    assert row.total == 8 and row.inner_loops == 0
    work = kr.Work(blocks=gpu.sms, flops=4096e9, dram_bytes=1.9e9, formula="")
    timing = kr.modelled_time(row, work, gpu)
    assert timing.parts["compute"] == pytest.approx(4096e9 / gpu.tensor16)
    assert timing.parts["issue"] == pytest.approx(8e9 / (gpu.sms * 4 * gpu.clock_hz))
    assert timing.parts["memory"] == pytest.approx(1e-3)
    assert timing.bound == "issue" and not timing.approximate
    # one block more than SMs: the busiest SM runs two, half of the machine idles in the tail
    tail = kr.modelled_time(row, kr.Work(gpu.sms + 1, 4096e9 * (gpu.sms + 1) / gpu.sms, 0, ""), gpu)
    assert tail.parts["issue"] == pytest.approx(2 * timing.parts["issue"])


def test_partial_triton_sweep_replaces_only_its_kernels(tmp_path):
    """--triton-kernels with --write-triton-calibration: the swept kernels' entries for the swept
    (arch, dtype) pairs are replaced, in place; other kernels, dtypes and archs stay."""
    pytest.importorskip("triton")
    path = tmp_path / "calibration.py"
    keep = {(80, "fp16", "_attn_fwd", 64): {((("BLOCK_EV", 64),), 4, 2): 1},
            (80, "fp32", "_attn_bwd_dq", False, 64, 128): {((("BLOCK_M", 32),), 8, 2): 2}}
    old = {(80, "fp16", "_attn_bwd_dq", False, 64, 128): {((("BLOCK_M", 64),), 4, 2): 3}}
    first, second = keep.items()
    path.write_text("CLEAN_CONFIGS = " + repr(dict([first, *old.items(), second])) + "\n")
    row = {"kernel": "_attn_bwd_dq", "mode": "EV_SINGLE=True", "blocks": {"BLOCK_M": 64, "BLOCK_N": 32},
           "warps": 4, "stages": 2, "shared": 110592, "stack": 0}
    spilled = {**row, "blocks": {"BLOCK_M": 128, "BLOCK_N": 64}, "stack": 8}
    kr.write_triton_calibration(path, {(80, "fp16"): [row, spilled]}, frozenset({"_attn_bwd_dq"}))
    import runpy

    table = runpy.run_path(str(path))["CLEAN_CONFIGS"]
    assert list(table) == [first[0], (80, "fp16", "_attn_bwd_dq", True, 64, 512), second[0]]
    assert table[(80, "fp16", "_attn_bwd_dq", True, 64, 512)] == {
        ((("BLOCK_M", 64), ("BLOCK_N", 32)), 4, 2): 110592}
    assert all(table[key] == value for key, value in keep.items())


def _triton_row(kernel, hgmma, kept=True, stack=0):
    return {"kernel": kernel, "mode": "", "blocks": {"BLOCK_M": 128, "BLOCK_N": 64}, "warps": 8, "stages": 2,
            "kept": kept, "total": 2, "kept_count": 1, "shared_limit": 232448, "cached": True,
            "registers": 200, "stack": stack, "shared": 65536, "hgmma": hgmma}


def test_triton_hgmma_row_is_enforced_for_the_forward_only():
    """A kept sm_90 fp16 forward config without HGMMA fails --check; a backward one is printed only;
    sm_80 rows have no HGMMA row."""
    for hgmma, expect_failure in ((8, False), (0, True)):
        rows = {(90, "fp16"): [_triton_row("_attn_fwd", hgmma), _triton_row("_attn_bwd_dq", 0)],
                (80, "fp16"): [{**_triton_row("_attn_fwd", 0), "shared_limit": 166912}]}
        failures, lines = [], []
        kr._triton_section(lines.append, rows, failures, detail=False)
        text = "\n".join(lines)
        assert "PASS [enforced]" in text or "FAIL [enforced]" in text
        hgmma_failures = [f for f in failures if "HGMMA" in f]
        assert bool(hgmma_failures) == expect_failure, failures
        assert all("_attn_fwd" in f and "sm_90" in f for f in hgmma_failures)
        listed = {(k, d) for k, _, d, *_ in kr.triton_hgmma_rows(rows)}
        assert listed == {("_attn_fwd", "fp16"), ("_attn_bwd_dq", "fp16")}


def test_count_opcode_reads_sass_lines():
    pytest.importorskip("triton")
    from attnseg.triton.offline import count_opcode

    sass = """
        /*0a10*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;
        /*0a20*/              @!P0 HGMMA.64x128x16.F32 R24, gdesc[UR8], R24, gsb0 ;
        /*0a30*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0a40*/                   MOV R1, c[0x0][0x28] ;  // HGMMA in a comment
"""
    assert count_opcode(sass, "HGMMA") == 2
    assert count_opcode(sass, "HMMA") == 1
    assert count_opcode(sass, "MOV") == 1


def test_dq_reduction_check():
    """The dK/dQ kernels' dQ path in the main loop: the atomic entries need fp32 atomic reductions
    (the flash kernel's cell pairs: only the vector form on sm_90), the ordered variants none."""

    def code(*opcodes):
        return [kr.Instruction(16 * i, op, "") for i, op in enumerate(opcodes)]

    scalar = code("HMMA.16816.F32", "RED.E.ADD.F32.FTZ.RN.STRONG.GPU", "RED.E.ADD.F32.FTZ.RN.STRONG.GPU")
    vector = code("HMMA.16816.F32", "REDG.E.ADD.F32x2.FTZ.RN.STRONG.GPU")
    plain = code("HMMA.16816.F32", "LDG.E.64", "STG.E.64", "ATOMG.E.ADD.STRONG.GPU")  # an int atomic: not a dQ add
    assert kr._dq_reduction_check("atomic pairs", 80, scalar) == (True, "2")
    assert kr._dq_reduction_check("atomic pairs", 90, scalar) == (False, "2")
    assert kr._dq_reduction_check("atomic pairs", 90, vector) == (True, "1 (1 x2)")
    assert kr._dq_reduction_check("atomic", 90, scalar) == (True, "2")
    assert kr._dq_reduction_check("atomic", 80, plain) == (False, "0")
    assert kr._dq_reduction_check("ordered", 80, plain) == (True, "0")
    assert kr._dq_reduction_check("ordered", 90, vector) == (False, "1 (1 x2)")
    assert kr.classify("REDG.E.ADD.F32x2.FTZ.RN.STRONG.GPU") == "ldst"
    # the parser keeps sm_90's lowercase vector suffix in the opcode
    (parsed,) = kr.parse_sass("Function : f\n /*0080*/ REDG.E.ADD.F32x2.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R6 ;")["f"]
    assert parsed.opcode == "REDG.E.ADD.F32x2.FTZ.RN.STRONG.GPU" and parsed.operands == "desc[UR4][R2.64], R6"
    (wgmma,) = kr.parse_sass("Function : f\n /*0a10*/ HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;")["f"]
    assert wgmma.opcode == "HGMMA.64x128x16.F32" and kr.classify(wgmma.opcode) == "tensor"


def test_dkdq_kernels_are_reported_on_both_dq_paths():
    """Every dK/dQ kernel has an enforced entry for the default atomic dQ path and one for the
    ordered (deterministic) variant, which the op's FLOP sums leave out: the same work counted once."""
    by_name = {e.name: e for e in kr.KERNELS}
    pairs = [(by_name[f"flash_attention_bwd_dkdq[{layout}]"], by_name[f"flash_attention_bwd_dkdq_ordered[{layout}]"])
             for layout in ("channel-first", "contiguous")]
    pairs.append((by_name["ffma_attention_bwd_dkdq[channel-first-q]"],
                  by_name["ffma_attention_bwd_dkdq_ordered[channel-first-q]"]))
    for atomic, ordered in pairs:
        assert atomic.enforced and ordered.enforced and atomic.impl == ordered.impl
        assert atomic.kernel.endswith("false>") and ordered.kernel.endswith("true>")
        assert atomic.dq_accumulation.startswith("atomic") and ordered.dq_accumulation == "ordered"
        assert ordered.variant_of == atomic.name and not atomic.variant_of
    assert pairs[0][0].dq_accumulation == "atomic pairs" and pairs[2][0].dq_accumulation == "atomic"

    atomic, ordered = pairs[0]
    constants = {"rows": 64, "cols": 32, "head_dim": 64, "ev_tile": 512, "threads": 128, "smem": 0}
    rows = []
    for entry in (atomic, ordered):
        row = _row(entry=entry)
        row.constants = constants
        rows.append(row)
    lines, failures = [], []
    kr._cuda_sections(lines.append, rows, [80], ["fp16"], kr.SHAPES[:1], failures)
    (flops_line,) = [line for text in lines for line in text.splitlines()
                     if line.startswith("| attention_bwd (fa2) [enforced]")]
    issued = kr.flash_attention_bwd_dkdq(kr.SHAPES[0], constants, 2).flops
    assert flops_line.split("|")[4].strip() == f"{issued / 1e9:.0f}"
