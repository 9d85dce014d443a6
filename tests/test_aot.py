"""kernels/_aot.py's reading of a build: a synthetic SASS listing with nested loops and spills."""
from source_fast.kernels import _aot

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR4], R24 ;
        /*0030*/                   LDL R3, [R1] ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R6.64] ;
        /*0060*/               @P0 BRA 0x40 ;
        /*0070*/                   STL [R1+0x4], R4 ;
        /*0080*/              @!P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""
USAGE = "Function kernel:\n REG:255 STACK:8 SHARED:0 LOCAL:0"


def test_sass_report_counts_loops_operands_and_spills_in_the_inner_loop():
    report = _aot._sass_report(SASS, USAGE)
    assert report["reg"] == 255 and report["stack"] == 8
    assert report["LOOPS"] == 2  # 0x40..0x60 inside 0x10..0x80; the trailing branch to itself is no loop
    assert report["HGMMA"] == 2 and report["HGMMA_REG_A"] == 1 and report["wgmma"] == ["64x128x16"]
    assert report["LDGSTS"] == 1
    # STL at 0x10 and 0x70, LDL at 0x30: all in the outer loop, none in the inner one (0x40..0x60)
    assert report["SPILL_IN_LOOP"] == 0
    inner_spill = SASS.replace("LDGSTS.E.BYPASS.128 [R5], desc[UR6][R6.64]", "LDL R7, [R1+0x8]")
    assert _aot._sass_report(inner_spill, USAGE)["SPILL_IN_LOOP"] == 1
    assert _aot._sass_report(SASS, "no usage line") is None
