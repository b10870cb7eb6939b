"""The private CUDA sources (``_lowrank.cu``, ``_bicluster.cu``), whose launch tables live in their own ops modules:
the same NVRTC checks as the package sources (test_cuda_compile.py, test_cuda_ptx_signatures.py), once for each.
The module-specific checks (shared constants, driving every entry point) are in test_cuda_<name>_nvrtc.py."""
import numpy as np
import pytest
from nvrtc_tools import ARCHS, compile_source, declared_sizes, ptx_entries, ptx_of_source, ptxas_report

from npconv.kernels.cuda import loader, ops, ops_bicluster, ops_lowrank

pytestmark = pytest.mark.nvrtc
DTYPE_NAMES = ("float32", "float64")
#: source name -> the ops module that owns its launch table
PRIVATE = {ops_lowrank.SOURCE: ops_lowrank, ops_bicluster.SOURCE: ops_bicluster}


def test_every_private_source_has_its_module():
    assert set(loader.private_source_names()) == set(PRIVATE)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("source", sorted(PRIVATE))
def test_source_compiles_without_spills(source, dtype_name, arch):
    cubin, log = compile_source(source, dtype_name, arch)
    assert cubin[:4] == b"\x7fELF"
    report = ptxas_report(log)
    want = {loader.kernel_name(k, dtype_name) for k in PRIVATE[source].LAUNCH_SIGNATURES}
    assert set(report) == want, f"entry points in the cubin: {sorted(report)}"
    rows = [f"sm_{arch} {n:32s} regs {r['registers']:>3} stack {r['stack']} spill {r['spill_stores']}/"
            f"{r['spill_loads']}" for n, r in sorted(report.items())]
    print("\n" + "\n".join(rows))
    assert all(not (r["stack"] or r["spill_stores"] or r["spill_loads"]) for r in report.values()), rows


@pytest.mark.parametrize("source", sorted(PRIVATE))
def test_source_is_built_like_the_package_sources(source):
    """Same two #define lines and prelude as a package source; a launch table of its own, disjoint from the others."""
    mod = PRIVATE[source]
    for dt in (np.float32, np.float64):
        ours = mod.source_text(dt)
        theirs = loader.source_text("elementwise", dt)
        head = theirs[:theirs.index('#line 1 "elementwise.cu"')]
        assert ours.startswith(head) and f'#line 1 "{source}.cu"' in ours
    assert source not in loader.source_names()
    others = set(ops.LAUNCH_SIGNATURES).union(*(set(m.LAUNCH_SIGNATURES) for s, m in PRIVATE.items() if s != source))
    assert not set(mod.LAUNCH_SIGNATURES) & others
    with pytest.raises(TypeError, match="float32 or float64"):
        mod.source_text(np.float16)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("source", sorted(PRIVATE))
def test_launch_table_matches_ptx(source, dtype_name):
    mod = PRIVATE[source]
    found = ptx_entries(ptx_of_source(source, dtype_name))
    assert set(found) == {loader.kernel_name(k, dtype_name) for k in mod.LAUNCH_SIGNATURES}
    for name, (src, kinds) in mod.LAUNCH_SIGNATURES.items():
        assert src == source
        assert found[loader.kernel_name(name, dtype_name)] == declared_sizes(kinds, dtype_name), name
