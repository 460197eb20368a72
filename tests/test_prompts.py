"""Prompt variations for ESD (training/prompts.py)."""

import pytest

from conceptlab.training.prompts import (PromptSchedule, build_prompts, expand_templates, parse_concepts,
                                         parse_prompt_lines)


def test_expand_to_n_distinct_variations_all_naming_the_concept():
    p = expand_templates(["Van Gogh"], n=100, seed=0)
    assert len(p) == 100 and len(set(p)) == 100
    assert all("Van Gogh" in x for x in p)
    assert p[0] == "Van Gogh"
    assert expand_templates(["Van Gogh"], n=100, seed=0) == p
    assert expand_templates(["Van Gogh"], n=100, seed=1) != p


def test_several_concepts_alternate_and_templates_are_checked():
    p = expand_templates(["Van Gogh", "Monet"], ["{subject} by {concept}"], n=5)
    assert len(p) == 10
    assert sum("Monet" in x for x in p) == 5 and "Van Gogh" in p[0] and "Monet" in p[1]
    with pytest.raises(ValueError, match="no \\{concept\\}"):
        expand_templates(["x"], ["a painting"], n=3)
    with pytest.raises(ValueError, match="unknown field"):
        expand_templates(["x"], ["{concept} {colour}"], n=3)
    # the word lists run out: fewer than n, no duplicates
    assert len(expand_templates(["x"], ["{concept}"], n=10)) == 1


def test_parse_lines_concepts_and_build_prompts():
    assert parse_prompt_lines("a\n\n # comment\n  b  \n") == ["a", "b"]
    assert parse_concepts("Van Gogh; Monet\nVan Gogh") == ["Van Gogh", "Monet"]
    with pytest.raises(ValueError, match="no concept"):
        parse_concepts("  ;\n ")
    with pytest.raises(ValueError, match="no concept"):
        build_prompts("")
    assert build_prompts("Van Gogh") == ["Van Gogh"]
    assert len(build_prompts("Van Gogh", variations=20)) == 20
    lines = build_prompts("Van Gogh", prompts="starry night by Van Gogh\n{title} by {concept}", variations=3)
    assert lines[0] == "starry night by Van Gogh" and len(lines) == 4


def test_schedule_cycles_or_samples_and_counts():
    s = PromptSchedule(["a", "b", "c"], "cycle")
    assert [s.next()[1] for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert s.counts == {"a": 3, "b": 2, "c": 2}
    s1 = PromptSchedule(["a", "b", "c"], "sample", seed=3)
    s2 = PromptSchedule(["a", "b", "c"], "sample", seed=3)
    seq = [s1.next()[1] for _ in range(30)]
    assert seq == [s2.next()[1] for _ in range(30)]
    assert set(seq) == {"a", "b", "c"}
    with pytest.raises(ValueError):
        PromptSchedule([], "cycle")
    with pytest.raises(ValueError):
        PromptSchedule(["a"], "shuffle")
