"""Caption processing follows kohya-ss/sd-scripts train_util.process_caption (rules and random draws)."""

from __future__ import annotations

import random

import pytest

from conceptlab.training.lora.captions import CaptionConfig, process_caption, read_caption, tag_frequency

CAP = "mystyle, red hair, blue eyes, smiling, outdoors"


def _kohya_reference(caption, cfg, rnd, epoch):
    """sd-scripts' process_caption restated with the global-``random`` calls it makes (no wildcard/warm-up)."""
    if cfg.caption_prefix:
        caption = cfg.caption_prefix + " " + caption
    if cfg.caption_suffix:
        caption = caption + " " + cfg.caption_suffix
    drop = cfg.caption_dropout_rate > 0 and rnd.random() < cfg.caption_dropout_rate
    drop = drop or cfg.caption_dropout_every_n_epochs > 0 and epoch % cfg.caption_dropout_every_n_epochs == 0
    if drop:
        return ""
    caption = caption.split("\n")[0]
    if cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0:
        fixed, flex, suffix = [], [], []
        if cfg.keep_tokens_separator and cfg.keep_tokens_separator in caption:
            a, b = caption.split(cfg.keep_tokens_separator, 1)
            if cfg.keep_tokens_separator in b:
                b, c = b.split(cfg.keep_tokens_separator, 1)
                suffix = [t.strip() for t in c.split(",") if t.strip()]
            fixed = [t.strip() for t in a.split(",") if t.strip()]
            flex = [t.strip() for t in b.split(",") if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(",")]
            flex = tokens[:]
            if cfg.keep_tokens > 0:
                fixed, flex = flex[: cfg.keep_tokens], tokens[cfg.keep_tokens:]
        if cfg.shuffle_caption:
            rnd.shuffle(flex)
        if cfg.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rnd.random() >= cfg.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    return caption


@pytest.mark.parametrize("cfg", [
    CaptionConfig(),
    CaptionConfig(shuffle_caption=True, keep_tokens=1),
    CaptionConfig(shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.1),
    CaptionConfig(caption_tag_dropout_rate=0.5, keep_tokens_separator="|||"),
    CaptionConfig(shuffle_caption=True, keep_tokens_separator="|||", caption_prefix="pre", caption_suffix="suf"),
    CaptionConfig(caption_dropout_every_n_epochs=3, shuffle_caption=True),
])
def test_matches_kohya_reference_stream(cfg):
    caps = [CAP, "trigger ||| a, b, c ||| tail1, tail2", "one\nsecond line, x", " a , , b "]
    ours, ref = random.Random(7), random.Random(7)
    for epoch in range(1, 7):
        for cap in caps:
            assert process_caption(cap, cfg, ours, epoch=epoch) == _kohya_reference(cap, cfg, ref, epoch)


def test_prefix_suffix_joined_with_space_and_first_line_only():
    cfg = CaptionConfig(caption_prefix="pixel art,", caption_suffix="16-bit")
    assert process_caption("a cat", cfg, random.Random(0)) == "pixel art, a cat 16-bit"
    # kohya appends the suffix before taking the first line: multi-line captions lose it
    assert process_caption("a cat\nignored", cfg, random.Random(0)) == "pixel art, a cat"


def test_dropout_rate_distribution_and_fresh_draws():
    cfg = CaptionConfig(caption_dropout_rate=0.3)
    rng = random.Random(1)
    n = 4000
    empty = sum(process_caption(CAP, cfg, rng) == "" for _ in range(n))
    # binomial(4000, 0.3): sd ≈ 29; allow 5 sd
    assert abs(empty - 0.3 * n) < 5 * (n * 0.3 * 0.7) ** 0.5


def test_dropout_every_n_epochs_is_one_based():
    cfg = CaptionConfig(caption_dropout_every_n_epochs=2)
    rng = random.Random(0)
    got = {e: process_caption(CAP, cfg, rng, epoch=e) for e in range(1, 6)}
    assert got[2] == "" and got[4] == ""
    assert got[1] == got[3] == got[5] == CAP


def test_keep_tokens_does_nothing_without_shuffle_or_tag_dropout():
    cfg = CaptionConfig(keep_tokens=2, keep_tokens_separator="|||")
    rng = random.Random(0)
    assert process_caption("a ||| b, c", cfg, rng) == "a ||| b, c"
    assert process_caption(CAP, cfg, rng) == CAP
    assert any("do nothing" in w for w in cfg.warnings())


def test_shuffle_keeps_first_tokens_and_is_uniform():
    cfg = CaptionConfig(shuffle_caption=True, keep_tokens=1)
    rng = random.Random(3)
    first_flex = {}
    outs = set()
    n = 3000
    for _ in range(n):
        out = process_caption(CAP, cfg, rng).split(", ")
        assert out[0] == "mystyle"
        assert sorted(out[1:]) == sorted(CAP.split(", ")[1:])
        first_flex[out[1]] = first_flex.get(out[1], 0) + 1
        outs.add(tuple(out))
    assert len(first_flex) == 4
    for count in first_flex.values():  # each of 4 flex tags first ≈ 1/4
        assert abs(count - n / 4) < 5 * (n * 0.25 * 0.75) ** 0.5
    assert len(outs) == 24  # every permutation of the 4 flexible tags appears


def test_tag_dropout_only_touches_flexible_tags():
    cfg = CaptionConfig(caption_tag_dropout_rate=0.5, keep_tokens_separator="|||")
    rng = random.Random(5)
    n = 2000
    counts = {t: 0 for t in ("b", "c", "d")}
    for _ in range(n):
        out = process_caption("a, k ||| b, c, d ||| z", cfg, rng).split(", ")
        assert out[:2] == ["a", "k"] and out[-1] == "z"
        for t in out[2:-1]:
            counts[t] += 1
    for c in counts.values():
        assert abs(c - n / 2) < 5 * (n * 0.25) ** 0.5


def test_read_caption_and_tag_frequency(tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(b"")
    assert read_caption(img, ".txt") is None
    (tmp_path / "cat.txt").write_text("Red, blue\nsecond line", encoding="utf-8")
    assert read_caption(img, "txt") == "Red, blue"
    (tmp_path / "cat.caption").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_caption(img, ".caption")
    assert tag_frequency(["Red, blue", "red,  , green"]) == {"red": 2, "blue": 1, "green": 1}


def test_bad_caption_options():
    with pytest.raises(ValueError, match="caption_dropout_rate"):
        CaptionConfig.from_mapping({"caption_dropout_rate": 1.5})
