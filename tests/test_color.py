"""Tests for metrics/color.py: hex parsing, colour spaces, CIEDE2000 (Sharma et al. 2005 test data), names."""

from __future__ import annotations

import numpy as np
import pytest

from conceptlab.metrics import color as C

# G. Sharma, W. Wu, E. N. Dalal, "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Color Res. Appl. 30(1) 2005, Table 1:
# (L1, a1, b1, L2, a2, b2, ΔE00) for the 34 published pairs.
SHARMA_2005 = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]


def test_ciede2000_reproduces_sharma_table_to_4_decimals():
    t = np.array(SHARMA_2005, dtype=np.float64)
    assert t.shape == (34, 7)
    d = C.delta_e00(t[:, :3], t[:, 3:6])
    np.testing.assert_allclose(d, t[:, 6], atol=5e-5, rtol=0)
    # symmetric
    np.testing.assert_allclose(C.delta_e00(t[:, 3:6], t[:, :3]), t[:, 6], atol=5e-5, rtol=0)


def test_delta_e00_broadcasts_and_is_zero_on_identity():
    labs = C.srgb_to_lab(np.array([[10, 20, 30], [200, 100, 50], [0, 0, 0]], np.uint8))
    d = C.delta_e00(labs[:, None, :], labs[None, :, :])
    assert d.shape == (3, 3)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-9)
    assert (d[~np.eye(3, dtype=bool)] > 1).all()
    with pytest.raises(ValueError):
        C.delta_e00(np.zeros((2, 2)), np.zeros((2, 3)))


@pytest.mark.parametrize("good,rgb", [
    ("#03dc73", (3, 220, 115)), ("#03DC73", (3, 220, 115)), ("  #2c1600 ", (44, 22, 0)),
    ("#abc", (170, 187, 204)), ("ffffff", (255, 255, 255)),
    ("#03dc73ff", (3, 220, 115)), ("#abcd", (170, 187, 204)),  # alpha forms: alpha trimmed
])
def test_parse_hex_accepts(good, rgb):
    assert C.parse_hex(good) == rgb


@pytest.mark.parametrize("bad", ["#12345", "#GGGGGG", "#", "", "#12", "#1234567", "#12 345", "red"])
def test_parse_hex_rejects_with_clear_message(bad):
    with pytest.raises(C.MalformedHexError) as e:
        C.parse_hex(bad)
    assert "malformed hex" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_parse_hex_non_string():
    with pytest.raises(C.MalformedHexError):
        C.parse_hex(123456)


def test_rgb_to_hex_roundtrip_and_find_codes():
    for h in ["#03dc73", "#2c1600", "#f7d7c0", "#000000", "#ffffff"]:
        assert C.rgb_to_hex(C.parse_hex(h)) == h
    assert C.rgb_to_hex((1.0, 0.0, 0.5)) == "#ff0080"
    found = C.find_hex_codes("hair (#03dc73), eyes (#12345), palette: #03DC73, #GGGGGG")
    assert [r for r, _ in found] == ["#03dc73", "#12345", "#03DC73", "#GGGGGG"]
    assert [v is None for _, v in found] == [False, True, False, True]


def test_lab_matches_known_values():
    # sRGB white → L*=100, a*=b*=0; sRGB red → (53.24, 80.09, 67.20) (D65), from the sRGB/CIELAB definitions
    lab = C.srgb_to_lab(np.array([[255, 255, 255], [255, 0, 0], [0, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.05)
    np.testing.assert_allclose(lab[2], [0, 0, 0], atol=1e-6)
    # float and uint8 inputs agree
    np.testing.assert_allclose(C.srgb_to_lab(np.array([1.0, 0.0, 0.0])), lab[1], atol=1e-9)


def test_oklab_matches_ottosson_reference_values():
    # reference values of sRGB primaries in OKLab (Ottosson 2020 / CSS Color 4 examples)
    ok = C.srgb_to_oklab(np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8))
    np.testing.assert_allclose(ok[0], [0.627955, 0.224863, 0.125846], atol=2e-5)
    np.testing.assert_allclose(ok[1], [0.866440, -0.233888, 0.179498], atol=2e-5)
    np.testing.assert_allclose(ok[2], [0.452014, -0.032457, -0.311528], atol=2e-5)
    np.testing.assert_allclose(ok[3], [1.0, 0.0, 0.0], atol=1e-5)


def test_oklab_roundtrip():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(1000, 3), dtype=np.uint8)
    back = C.oklab_to_srgb(C.srgb_to_oklab(rgb), as_uint8=True)
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 1


@pytest.mark.parametrize("hexcode,family", [
    ("#ff0000", "Red"), ("#ffa500", "Orange"), ("#ffff00", "Yellow"), ("#00ff00", "Green"),
    ("#00ffff", "Cyan"), ("#0000ff", "Blue"), ("#800080", "Purple"), ("#ffc0cb", "Pink"),
    ("#8b4513", "Brown"), ("#000000", "Black"), ("#ffffff", "White"), ("#808080", "Gray"),
    ("#03dc73", "Green"), ("#ff69b4", "Pink"), ("#008080", "Cyan"), ("#000080", "Blue"),
    ("#dc143c", "Red"), ("#a0522d", "Brown"), ("#c0c0c0", "Gray"), ("#111111", "Black"),
])
def test_color_family(hexcode, family):
    assert C.color_family(hexcode) == family


def test_color_family_vectorised():
    fam = C.color_family(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))
    assert fam.shape == (1, 2) and list(fam[0]) == ["Red", "Blue"]


def test_color_name_nearest_css():
    assert C.color_name("#ff0000") == "red"
    assert C.color_name((0, 0, 128)) == "navy"
    assert C.color_name("#fe0101") == "red"
    assert C.color_name("#808081") == "gray"


@pytest.mark.parametrize("word,family", [
    ("blonde", "Yellow"), ("teal", "Cyan"), ("crimson", "Red"), ("green", "Green"), ("dark green", "Green"),
    ("Light-Blue", "Blue"), ("reddish", "Red"), ("seagreen", "Green"), ("grey", "Gray"), ("hair", None),
    ("", None),
])
def test_hue_family_of_word(word, family):
    assert C.hue_family_of_word(word) == family


def test_families_compatible():
    assert C.families_compatible("Red", "Pink") and C.families_compatible("Brown", "Black")
    assert not C.families_compatible("Green", "Pink")


@pytest.mark.parametrize("hexcode,family", [
    ("#dfefd7", "White"),  # DB16's off-white: OKLCh C 0.036 at L 0.93 — tiny chroma near white reads white
    ("#f0fff0", "White"), ("#fff0f5", "White"), ("#e6e6fa", "White"),
    ("#add8e6", "Cyan"),  # lightblue: light but clearly tinted, stays chromatic
    ("#eee8aa", "Yellow"), ("#98fb98", "Green"), ("#b0c4de", "Blue"), ("#ffb6c1", "Pink"),
    ("#d3d3d3", "Gray"), ("#8696a2", "Gray"),
])
def test_color_family_near_white_pastels(hexcode, family):
    assert C.color_family(hexcode) == family


def test_achromatic_cutoff_rises_only_near_white():
    # same hue and chroma: chromatic at mid lightness, White once very light
    mid = C.oklab_to_srgb(np.array([0.70, 0.0, 0.045]), as_uint8=True)
    light = C.oklab_to_srgb(np.array([0.96, 0.0, 0.045]), as_uint8=True)
    assert C.color_family(mid) not in ("White", "Gray", "Black")
    assert C.color_family(light) == "White"


def test_numpy_lab_fast_path_equals_kornia():
    """uint8 input takes a numpy path (no torch call overhead); it must equal kornia's rgb_to_lab."""
    import kornia.color as kc
    import torch

    rng = np.random.default_rng(1)
    rgb = np.concatenate([rng.integers(0, 256, (20000, 3)), np.indices((16, 16, 16)).reshape(3, -1).T * 17])
    rgb = rgb.astype(np.uint8)
    fast = C.srgb_to_lab(rgb)
    t = torch.from_numpy(rgb.T.astype(np.float64) / 255.0).unsqueeze(-1)
    ref = kc.rgb_to_lab(t).squeeze(-1).T.numpy()
    assert np.abs(fast - ref).max() < 1e-4
    assert np.abs(C.srgb_to_lab(rgb.astype(np.float64) / 255.0) - ref).max() < 1e-9  # float path is kornia


def test_numpy_srgb_encode_equals_kornia():
    import kornia.color as kc
    import torch

    lin = np.linspace(0.0, 1.0, 5001)
    ref = kc.linear_rgb_to_rgb(torch.from_numpy(np.stack([lin] * 3)).unsqueeze(-1))[0, :, 0].numpy()
    assert np.abs(C._encode_srgb(lin) - ref).max() < 1e-6
