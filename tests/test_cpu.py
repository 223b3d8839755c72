"""What the CPU offers the int8 kernels (cvt_deploy/cpu.py): whether OpenVINO's 8-bit dot
products saturate here, read from the CPU's features and oneDNN's instruction-set cap, for any
CPU the suite runs on (each case sets the features; nothing assumes this machine's)."""
from __future__ import annotations

import pytest

from cvt_deploy import cpu


@pytest.fixture
def x86(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Set the CPU's features (an x86 machine); no oneDNN cap unless a case sets one."""
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    for name in cpu.ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def have(*features: str) -> None:
        monkeypatch.setattr(cpu, "cpu_features", lambda: list(features))

    return have


@pytest.mark.parametrize("features, cap, saturates", [
    (("avx2",), None, True),                                        # an AVX2 laptop or cloud CPU
    (("avx2", "avx512f"), None, True),                              # Skylake-SP: AVX-512 without VNNI
    (("avx2", "avx512f", "avx512_vnni"), None, False),              # Cascade Lake, Zen 4
    (("avx2", "avx_vnni"), None, False),                            # Alder Lake
    (("avx2", "avx512f", "avx512_vnni", "amx_int8"), None, False),  # Sapphire Rapids
    (("avx2", "avx512f", "avx512_vnni"), "AVX2", True),             # capped below its VNNI
    (("avx2", "avx512f", "avx512_vnni"), "avx512_core", True),      # the cap's case does not matter
    (("avx2", "avx512f", "avx512_vnni"), "AVX512_CORE_VNNI", False),
    (("avx2", "avx512f", "avx512_vnni"), "ALL", False),
    (("avx2", "avx_vnni"), "AVX2_VNNI", False),
    (("avx2", "avx512f", "avx512_vnni"), "AVX2_VNNI", True),        # no avx_vnni to use at that level
    (("avx2", "avx512f", "avx512_vnni", "amx_int8"), "AVX512_CORE_AMX", False),
    (("avx2",), "ALL", True),
])
def test_int8_saturation_follows_the_features_and_the_cap(x86, monkeypatch: pytest.MonkeyPatch, features: tuple[str, ...],
                                                          cap: str | None, saturates: bool) -> None:
    x86(*features)
    if cap is not None:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    reason = cpu.int8_saturation()
    assert (reason is not None) == saturates, reason
    if saturates:
        assert "16 bits" in reason and "VNNI" in reason  # type: ignore[operator]
        # a CPU with VNNI saturates only under a cap, and the reason says so
        assert ("ONEDNN_MAX_CPU_ISA" in reason) == any("vnni" in f for f in features), reason  # type: ignore[operator]


def test_the_onednn_variable_wins_over_the_dnnl_one(x86, monkeypatch: pytest.MonkeyPatch) -> None:
    x86("avx2", "avx512f", "avx512_vnni")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert cpu.isa_cap() == "AVX2" and cpu.int8_saturation() is not None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert cpu.isa_cap() is None and cpu.int8_saturation() is None


def test_where_nothing_is_known_or_it_is_not_x86_nothing_is_refused(x86, monkeypatch: pytest.MonkeyPatch) -> None:
    x86()  # no /proc/cpuinfo (macOS, Windows): OpenVINO is not second-guessed
    assert cpu.int8_saturation() is None
    x86("asimd", "asimddp")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert cpu.int8_saturation() is None


def test_a_cap_is_part_of_the_cpu_key(x86, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timings taken under a cap are another CPU's: load() must not follow uncapped ones there."""
    x86("avx2", "avx512f", "avx512_vnni")
    assert cpu.cpu_key() == "x86_64 avx2 avx512f avx512_vnni"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert cpu.cpu_key() == "x86_64 avx2 avx512f avx512_vnni onednn-max-isa=AVX2"


def test_this_machine_is_read_as_it_is() -> None:
    """The real /proc/cpuinfo: the features found are a subset of what is known, and the answer
    is consistent with them (whatever this CPU is)."""
    have = set(cpu.cpu_features())
    assert have <= set(cpu.FEATURES)
    if cpu.isa_cap() is None and have & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        assert cpu.int8_saturation() is None
