"""Prompt variations for concept erasure: a multiline list, or ``{concept}`` templates expanded to N variants.

ESD (Gandikota et al., ICCV 2023) trains on the bare concept text ("Van Gogh"). Erasing with many phrasings of
the concept ("a wheat field by Van Gogh", "portrait of a farmer in the style of Van Gogh", …) makes the erasure
hold across the ways people actually prompt. This module builds those phrasings deterministically from small
built-in word lists (styles / media, subjects, artwork titles — written for this project) and schedules them
per iteration (cycling or seeded sampling).

Template fields: ``{concept}`` (required to mention the concept), ``{subject}``, ``{medium}``, ``{title}``,
``{adjective}``. Unknown fields raise ``ValueError``.
"""

from __future__ import annotations

import itertools
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

MEDIA = (
    "painting", "oil painting", "watercolor", "sketch", "charcoal drawing", "pencil drawing", "etching",
    "gouache study", "pastel drawing", "ink drawing", "print", "mural", "fresco", "canvas", "illustration",
    "poster", "lithograph", "woodcut", "digital painting", "study",
)
SUBJECTS = (
    "a starry night over a village", "a wheat field with cypresses", "sunflowers in a vase", "a self-portrait",
    "a portrait of a farmer", "a cafe terrace at night", "a bedroom with a wooden bed", "olive trees",
    "irises in a garden", "a bridge over a river", "a harbour with fishing boats", "a country road at dusk",
    "a vineyard in autumn", "a city street in the rain", "a mountain landscape", "a still life with fruit",
    "a lighthouse by the sea", "a church in a small town", "almond blossoms", "a woman reading a book",
    "a cat sleeping on a chair", "a forest path", "a field of poppies", "a windmill", "a night sky with a moon",
    "peasants at work", "a garden with flowers", "a boat on a lake", "a house on a hill", "a crowded market",
)
TITLES = (
    "The Starry Night", "Wheatfield with Crows", "Sunflowers", "Cafe Terrace at Night", "The Bedroom",
    "Irises", "Almond Blossom", "The Potato Eaters", "Olive Trees", "Self-Portrait with a Straw Hat",
    "The Night Cafe", "Starry Night Over the Rhone", "The Yellow House", "Cypresses", "The Sower",
    "Road with Cypress and Star", "Green Wheat Field", "The Red Vineyard", "Harvest at La Crau",
    "Portrait of a Postman", "Fishing Boats on the Beach", "Houses at Auvers", "The Mulberry Tree",
    "Poppy Field", "Landscape at Twilight",
)
ADJECTIVES = (
    "vivid", "expressive", "swirling", "bold", "textured", "colourful", "dreamy", "moody", "luminous",
    "impasto", "thick-brushed", "melancholic", "bright", "detailed", "famous",
)

DEFAULT_TEMPLATES = (
    "{concept}",
    "a painting by {concept}",
    "{subject}, by {concept}",
    "{subject} in the style of {concept}",
    "{title} by {concept}",
    "a {medium} of {subject} by {concept}",
    "{adjective} {medium} in the style of {concept}",
    "art by {concept}",
    "{concept} style {medium}",
    "{title}, {adjective} {medium}, {concept}",
)

_FIELDS = {"concept", "subject", "medium", "title", "adjective"}
_LISTS = {"subject": SUBJECTS, "medium": MEDIA, "title": TITLES, "adjective": ADJECTIVES}


def parse_prompt_lines(text: str | Sequence[str] | None) -> list[str]:
    """Split a multiline string (or take a list) into prompts: stripped, blank lines and ``#`` comments dropped."""
    if text is None:
        return []
    lines = text.splitlines() if isinstance(text, str) else [str(t) for t in text]
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def parse_concepts(text: str | Sequence[str] | None) -> list[str]:
    """Concepts from ``"Van Gogh; Monet"`` / one per line / a list. Raises ``ValueError`` when there is none."""
    if text is None:
        items: list[str] = []
    elif isinstance(text, str):
        items = [t.strip() for part in text.splitlines() for t in part.split(";")]
    else:
        items = [str(t).strip() for t in text]
    items = [t for t in items if t and not t.startswith("#")]
    if not items:
        raise ValueError("no concept given: name the concept to erase (e.g. 'Van Gogh')")
    return list(dict.fromkeys(items))


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def expand_templates(concepts: Sequence[str], templates: Sequence[str] | None = None, n: int = 100,
                     seed: int = 0) -> list[str]:
    """Expand ``{concept}`` templates to ``n`` distinct prompts per concept (fewer if the lists run out).

    Deterministic for a given ``seed``: combinations of the word lists are enumerated and shuffled with
    ``random.Random(seed)``; the first prompt for each concept is always the first template filled (so the bare
    concept comes first with the defaults). Prompts alternate across concepts.

    Raises ``ValueError`` for no concept, ``n < 1``, a template with an unknown field or without ``{concept}``.
    """
    concepts = parse_concepts(list(concepts))
    if int(n) < 1:
        raise ValueError(f"number of prompt variations must be ≥ 1, got {n}")
    templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
    for t in templates:
        f = _fields(t)
        if "concept" not in f:
            raise ValueError(f"template {t!r} has no {{concept}} field")
        bad = f - _FIELDS
        if bad:
            raise ValueError(f"template {t!r} uses unknown field(s) {sorted(bad)}; known: {sorted(_FIELDS)}")
    rng = random.Random(int(seed))
    per_concept = []
    for concept in concepts:
        out: list[str] = []
        seen: set[str] = set()
        pools = []
        for t in templates:
            names = sorted(_fields(t) - {"concept"})
            combos = list(itertools.product(*[_LISTS[k] for k in names])) if names else [()]
            rng.shuffle(combos)
            pools.append((t, names, iter(combos)))
        # round-robin over templates so every phrasing is represented
        while len(out) < n and pools:
            alive = []
            for t, names, it in pools:
                combo = next(it, None)
                if combo is None:
                    continue
                alive.append((t, names, it))
                p = t.format(concept=concept, **dict(zip(names, combo)))
                p = " ".join(p.split())
                if p not in seen:
                    seen.add(p)
                    out.append(p)
                    if len(out) >= n:
                        break
            pools = alive
        per_concept.append(out)
    merged = []
    for group in itertools.zip_longest(*per_concept):
        merged.extend(p for p in group if p is not None)
    return merged


@dataclass
class PromptSchedule:
    """Which prompt each iteration uses: ``"cycle"`` (in order, wrapping) or ``"sample"`` (seeded uniform).

    ``next()`` returns ``(index, prompt)`` and counts usage in :attr:`counts` (``{prompt: n}``).
    Raises ``ValueError`` for an empty prompt list or an unknown order.
    """

    prompts: Sequence[str]
    order: str = "cycle"
    seed: int = 0
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.prompts = [p for p in self.prompts if p and p.strip()]
        if not self.prompts:
            raise ValueError("no prompts to train on (empty concept / prompt list)")
        if self.order not in ("cycle", "sample"):
            raise ValueError(f"prompt order must be 'cycle' or 'sample', not {self.order!r}")
        self._rng = random.Random(int(self.seed))
        self._i = 0

    def next(self) -> tuple[int, str]:
        """The next ``(index into prompts, prompt)``; counts it in :attr:`counts`."""
        if self.order == "cycle":
            idx = self._i % len(self.prompts)
        else:
            idx = self._rng.randrange(len(self.prompts))
        self._i += 1
        p = self.prompts[idx]
        self.counts[p] += 1
        return idx, p


def build_prompts(concepts: str | Sequence[str], prompts: str | Sequence[str] | None = None,
                  templates: str | Sequence[str] | None = None, variations: int = 0, seed: int = 0) -> list[str]:
    """The training prompt list for the given concepts.

    Order of precedence: explicit ``prompts`` (multiline text or list: plain lines are used as they are, lines
    with ``{…}`` fields are templates expanded together to ``variations`` (default 100) prompts per concept);
    else ``templates`` expanded the same way; else, with ``variations > 0``, the built-in templates; else the
    bare concepts (the paper's setting).
    Raises ``ValueError`` for no concept.
    """
    concepts_l = parse_concepts(concepts)
    lines = parse_prompt_lines(prompts)
    if lines:
        plain = [ln for ln in lines if "{" not in ln]
        tmpl_lines = [ln for ln in lines if "{" in ln]
        out = list(plain)
        if tmpl_lines:
            out.extend(expand_templates(concepts_l, tmpl_lines, n=max(1, variations or 100), seed=seed))
        return list(dict.fromkeys(out))
    tmpl = parse_prompt_lines(templates)
    if tmpl:
        return expand_templates(concepts_l, tmpl, n=max(1, variations or 100), seed=seed)
    if variations and variations > 0:
        return expand_templates(concepts_l, None, n=variations, seed=seed)
    return concepts_l
