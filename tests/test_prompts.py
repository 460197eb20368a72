"""Prompt variations for ESD (training/esd/prompts.py)."""

import pytest

from conceptlab.training.esd.prompts import (PromptSchedule, build_prompts, expand_templates, parse_concepts,
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


# -- prompt variations by concept kind (issue: neutral templates) ----------------------------------------------

from conceptlab.training.esd.prompts import (KIND_TEMPLATES, KINDS, concept_kinds, infer_kind,  # noqa: E402
                                         normalize_kind, prompt_source)

# names and works of artists (and other concepts) that must never be baked into the generator
_FOREIGN = ("van gogh", "gogh", "monet", "picasso", "rembrandt", "vermeer", "hokusai", "klimt", "dali", "warhol",
            "kahlo", "starry night", "sunflowers", "water lil", "haystack", "cypress", "wheat", "almond blossom",
            "potato eaters", "night cafe", "mona lisa", "great wave", "guernica", "the kiss", "scream",
            "irises", "swirling", "impasto", "cowboy", "nudity", "nude", "taylor swift", "mickey")
_ART_WORDS = ("painting", "painted", "paint", "art", "artist", "artwork", "style", "drawing", "sketch", "canvas",
              "watercolor", "oil", "etching", "mural", "fresco", "illustration", "lithograph", "woodcut", "by")


@pytest.mark.parametrize("concept,kind", [("Claude Monet", "style"), ("Van Gogh", "style"),
                                          ("cowboy hat", "object"), ("nudity", "explicit"),
                                          ("Taylor Swift", "person"), ("red scarf", "attribute")])
def test_generated_prompts_name_only_their_concept(concept, kind):
    prompts = build_prompts(concept, variations=100, kind=kind, seed=0)
    assert len(prompts) == 100 and len(set(prompts)) == 100 and prompts[0] == concept
    for p in prompts:
        assert concept in p
        rest = p.replace(concept, " ").lower()
        hits = [w for w in _FOREIGN if w in rest]
        assert not hits, f"{p!r} names {hits}"
    if kind in ("object", "attribute", "person"):
        for p in prompts:
            words = set(p.replace(concept, " ").lower().replace(",", " ").split())
            assert not words & set(_ART_WORDS), f"{kind} prompt {p!r} is art phrasing"


def test_every_word_list_entry_is_concept_free():
    from conceptlab.training.esd import prompts as pr

    for lst in (pr.SUBJECTS, pr.MEDIA, pr.TITLES, pr.ADJECTIVES, pr.SETTINGS, pr.SHOTS, pr.LIGHTING, pr.ACTIONS,
                pr.CARRIERS):
        for item in lst:
            assert not [w for w in _FOREIGN if w in item.lower()], item


def test_kind_inference_rule_and_precedence():
    assert infer_kind("Claude Monet") == "style"
    assert infer_kind("Vincent van Gogh") == "style"
    assert infer_kind("pop art style") == "style"
    assert infer_kind("cowboy hat") == "object"
    assert infer_kind("nudity") == infer_kind("NSFW content") == "explicit"
    assert infer_kind("cowboy hat", erase_from="a cowboy") == "attribute"
    assert concept_kinds("Monet; parachute") == {"Monet": "style", "parachute": "object"}
    assert concept_kinds("Monet", "person") == {"Monet": "person"}  # the user's kind wins
    assert normalize_kind("Artist") == "style" and normalize_kind("character") == "person"
    with pytest.raises(ValueError, match="unknown concept kind"):
        normalize_kind("landscape")
    # user prompts / templates win over the kind's built-in templates
    assert build_prompts("cowboy hat", prompts="my own prompt", variations=50, kind="style") == ["my own prompt"]
    own = build_prompts("cowboy hat", templates="{concept} on a shelf", variations=5, kind="style")
    assert own == ["cowboy hat on a shelf"]
    assert prompt_source("x") == "user_prompts" and prompt_source(None, "{concept}") == "user_templates"
    assert prompt_source(variations=3) == "builtin_templates" and prompt_source() == "bare_concepts"
    # several concepts of different kinds each get their own kind's phrasing
    mixed = build_prompts("Claude Monet; cowboy hat", variations=20)
    assert any("painting by Claude Monet" in p for p in mixed)
    assert not any("by cowboy hat" in p or "style of cowboy hat" in p for p in mixed)
    assert set(KIND_TEMPLATES) == set(KINDS)
