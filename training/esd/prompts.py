"""Prompt variations for concept erasure, by concept kind: a multiline list, or ``{concept}`` templates expanded
to N variants from concept-free word lists.

ESD (Gandikota et al., ICCV 2023) trains on the bare concept text ("Van Gogh"). Erasing with many phrasings of
the concept makes the erasure hold across the ways people actually prompt. *Which* phrasings depends on what the
concept is: an artist is prompted as "a painting by X", an object as "a photo of X in a kitchen", a person as "X
smiling", an attribute as "a man with X". Each **kind** therefore has its own templates
(:data:`KIND_TEMPLATES`), filled from word lists written for this project that name no artist, work, person or
brand (so erasing Monet never trains the model away from anybody else's imagery, and erasing a hat is not
phrased as art).

Kinds (:data:`KINDS`): ``style`` (artist / art style), ``object``, ``person`` (person or character),
``attribute`` (a property of a scene — what ``erase_from`` erases), ``explicit`` (nudity and other explicit
content). Aliases: ``artist`` → style, ``character`` → person, ``nudity`` / ``nsfw`` → explicit.

**Inference rule** (``kind="auto"``, :func:`infer_kind`), applied per concept, first match wins:

1. an ``erase_from`` prompt is given → ``attribute`` (the concept is erased *from* a scene);
2. a word of the concept is in :data:`EXPLICIT_WORDS` (nudity, nude, naked, nsfw, …) → ``explicit``;
3. a word is in :data:`STYLE_WORDS` (style, art, artist, painting, …) → ``style``;
4. the concept is written like a proper name — every word capitalised except name particles (van, de, da,
   von, …), e.g. "Claude Monet", "Van Gogh", "Hokusai" → ``style`` (artists are ESD's main use; choose
   ``person`` yourself for people and characters: the rule cannot tell a painter from an actor);
5. otherwise → ``object`` ("cowboy hat", "church", "parachute").

Precedence: a user's own prompt list or templates always win over the built-in ones (:func:`build_prompts`);
a user-chosen kind wins over the inferred one. The kinds and whether they were inferred are recorded in the
erasure's ``metadata.json`` (:func:`concept_kinds`).

Template fields: ``{concept}`` (required), and the word lists ``{subject}``, ``{medium}``, ``{title}``,
``{adjective}`` (art), ``{setting}``, ``{shot}``, ``{lighting}``, ``{action}``, ``{carrier}`` (photo
phrasing). Any template may use any field; unknown fields raise ``ValueError``.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

# -- concept-free word lists (no artist, work, person or brand appears in any of them) ------------------------

MEDIA = (
    "painting", "oil painting", "watercolor", "sketch", "charcoal drawing", "pencil drawing", "etching",
    "gouache study", "pastel drawing", "ink drawing", "print", "mural", "fresco", "canvas", "illustration",
    "poster", "lithograph", "woodcut", "digital painting", "study",
)
SUBJECTS = (
    "a village at dusk", "a field of flowers", "a portrait of a woman", "a portrait of an old man",
    "a still life with fruit", "a harbour with boats", "a city street in the rain", "a mountain landscape",
    "a forest path", "a river in the evening", "a lighthouse by the sea", "a market square", "a garden in spring",
    "a cat on a windowsill", "a house on a hill", "a bridge over a canal", "a snowy village", "a boat on a lake",
    "a dancer", "a couple walking in a park", "a bowl of oranges", "a rocky coastline", "a train station",
    "a farmhouse", "a kitchen interior", "a child playing", "a busy cafe", "a country road", "a horse in a meadow",
    "a quiet beach",
)
TITLES = (
    "Untitled", "Evening", "Morning Light", "Study in Grey", "The Harbour", "Portrait of a Lady", "Still Life",
    "Landscape", "The Garden", "Winter", "The River", "Figure in an Interior", "Self-Portrait", "The Road",
    "Summer Afternoon", "The Orchard", "Two Figures", "View of a Town", "The Letter", "Seated Woman",
)
ADJECTIVES = (
    "vivid", "expressive", "bold", "textured", "colourful", "dreamy", "moody", "luminous", "soft", "detailed",
    "muted", "bright", "atmospheric", "delicate", "dramatic",
)
SETTINGS = (
    "a kitchen", "a living room", "a city street", "a park", "a garden", "an office", "a forest", "a beach",
    "a parking lot", "a shop window", "a field", "a workshop", "a classroom", "a train station", "a backyard",
    "a market", "a hotel lobby", "a mountain trail",
)
SHOTS = ("close-up", "wide-angle", "overhead", "side view", "front view", "low-angle", "high-resolution", "candid")
LIGHTING = ("in daylight", "in soft light", "at sunset", "at night", "on an overcast day", "with studio lighting",
            "in morning light", "at golden hour")
ACTIONS = (
    "smiling", "walking down a street", "sitting at a table", "standing outside", "looking at the camera",
    "reading a book", "laughing", "talking on the phone", "waving", "running", "drinking coffee",
    "giving a speech",
)
CARRIERS = (
    "a man", "a woman", "a child", "an old man", "a young woman", "a person", "a boy", "a girl", "a teenager",
    "an old woman", "a group of people", "a dog",
)

KINDS = ("style", "object", "person", "attribute", "explicit")
KIND_ALIASES = {"artist": "style", "art": "style", "character": "person", "nudity": "explicit",
                "nsfw": "explicit"}

KIND_TEMPLATES: dict[str, tuple[str, ...]] = {
    "style": (
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
    ),
    "object": (
        "{concept}",
        "a photo of {concept}",
        "a {shot} photo of {concept}",
        "{concept} in {setting}",
        "a photo of {concept} in {setting}, {lighting}",
        "an image of {concept}",
        "{concept}, {shot}, {lighting}",
        "a picture of {concept} in {setting}",
    ),
    "person": (
        "{concept}",
        "a photo of {concept}",
        "a portrait photo of {concept}",
        "a {shot} photo of {concept}",
        "{concept} {action}",
        "{concept} in {setting}",
        "a photo of {concept} {action} in {setting}",
        "{concept} {action}, {lighting}",
    ),
    "attribute": (
        "{concept}",
        "{carrier} with {concept}",
        "a photo of {carrier} with {concept}",
        "a {shot} photo of {carrier} with {concept}",
        "{carrier} with {concept} in {setting}",
        "{carrier} with {concept}, {lighting}",
    ),
    "explicit": (
        "{concept}",
        "a photo of {concept}",
        "an image containing {concept}",
        "{concept} in {setting}",
        "a {medium} depicting {concept}",
        "a {shot} photo of {concept}, {lighting}",
        "{carrier}, {concept}",
    ),
}
DEFAULT_TEMPLATES = KIND_TEMPLATES["style"]

EXPLICIT_WORDS = frozenset({
    "nudity", "nude", "nudes", "naked", "nsfw", "sexual", "sex", "porn", "pornography", "pornographic",
    "explicit", "erotic", "erotica", "topless", "lingerie", "gore", "gory",
})
STYLE_WORDS = frozenset({
    "style", "styles", "art", "artist", "artwork", "painting", "painter", "paintings", "aesthetic", "artstyle",
    "illustration", "illustrator",
})
NAME_PARTICLES = frozenset({"van", "von", "de", "da", "di", "del", "der", "den", "la", "le", "du", "dos", "das",
                            "y", "of", "the", "bin", "al"})


def normalize_kind(kind: str | None) -> str:
    """``"auto"`` or one of :data:`KINDS` (aliases resolved, case-insensitive). Raises ``ValueError``."""
    k = str(kind or "auto").strip().lower()
    k = KIND_ALIASES.get(k, k)
    if k != "auto" and k not in KINDS:
        raise ValueError(f"unknown concept kind {kind!r}; choose auto, {', '.join(KINDS)} "
                         f"(aliases: {', '.join(sorted(KIND_ALIASES))})")
    return k


def infer_kind(concept: str, erase_from: str | Sequence[str] | None = None) -> str:
    """The kind of ``concept`` by the module docstring's rule (erase_from → explicit words → style words →
    proper name → object). Returns one of :data:`KINDS`."""
    if erase_from:
        return "attribute"
    words = re.findall(r"[\w'-]+", str(concept))
    low = [w.lower() for w in words]
    if any(w in EXPLICIT_WORDS for w in low):
        return "explicit"
    if any(w in STYLE_WORDS for w in low):
        return "style"
    content = [w for w in words if w.lower() not in NAME_PARTICLES]
    if content and all(w[:1].isupper() for w in content):
        return "style"
    return "object"


def concept_kinds(concepts: str | Sequence[str], kind: str | None = "auto",
                  erase_from: str | Sequence[str] | None = None) -> dict[str, str]:
    """``{concept: kind}`` — the user's ``kind`` for every concept, or :func:`infer_kind` per concept for
    ``"auto"``. Raises ``ValueError`` for no concept or an unknown kind."""
    k = normalize_kind(kind)
    return {c: (infer_kind(c, erase_from) if k == "auto" else k) for c in parse_concepts(concepts)}


_LISTS = {"subject": SUBJECTS, "medium": MEDIA, "title": TITLES, "adjective": ADJECTIVES, "setting": SETTINGS,
          "shot": SHOTS, "lighting": LIGHTING, "action": ACTIONS, "carrier": CARRIERS}
_FIELDS = {"concept", *_LISTS}


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


def _check_templates(templates: Sequence[str]) -> None:
    for t in templates:
        f = _fields(t)
        if "concept" not in f:
            raise ValueError(f"template {t!r} has no {{concept}} field")
        bad = f - _FIELDS
        if bad:
            raise ValueError(f"template {t!r} uses unknown field(s) {sorted(bad)}; known: {sorted(_FIELDS)}")


def expand_templates(concepts: Sequence[str], templates: Sequence[str] | None = None, n: int = 100,
                     seed: int = 0, kind: str | Mapping[str, str] = "auto") -> list[str]:
    """Expand ``{concept}`` templates to ``n`` distinct prompts per concept (fewer if the lists run out).

    ``templates``: the user's templates for every concept; ``None`` = the built-in templates of each concept's
    kind (:data:`KIND_TEMPLATES`; ``kind`` is ``"auto"`` (:func:`infer_kind`), one kind for all, or a
    ``{concept: kind}`` mapping as :func:`concept_kinds` returns).

    Deterministic for a given ``seed``: combinations of the word lists are enumerated and shuffled with
    ``random.Random(seed)``; the first prompt for each concept is always the first template filled (so the bare
    concept comes first with the defaults). Templates are used round-robin; prompts alternate across concepts.

    Raises ``ValueError`` for no concept, ``n < 1``, a template with an unknown field or without ``{concept}``,
    or an unknown kind.
    """
    concepts = parse_concepts(list(concepts))
    if int(n) < 1:
        raise ValueError(f"number of prompt variations must be ≥ 1, got {n}")
    user = list(templates) if templates else None
    if user:
        _check_templates(user)
    kinds = dict(kind) if isinstance(kind, Mapping) else concept_kinds(concepts, kind)
    rng = random.Random(int(seed))
    per_concept = []
    for concept in concepts:
        k = normalize_kind(kinds.get(concept, "auto"))
        tmpl = user or list(KIND_TEMPLATES[infer_kind(concept) if k == "auto" else k])
        out: list[str] = []
        seen: set[str] = set()
        pools = []
        for t in tmpl:
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
                  templates: str | Sequence[str] | None = None, variations: int = 0, seed: int = 0,
                  kind: str | Mapping[str, str] = "auto") -> list[str]:
    """The training prompt list for the given concepts.

    Order of precedence (the user's own list always wins): explicit ``prompts`` (multiline text or list: plain
    lines are used as they are, lines with ``{…}`` fields are templates expanded together to ``variations``
    (default 100) prompts per concept); else ``templates`` expanded the same way; else, with
    ``variations > 0``, the built-in templates of each concept's kind (``kind``: ``"auto"``, a kind, or a
    ``{concept: kind}`` mapping; module docstring); else the bare concepts (the paper's setting).
    Raises ``ValueError`` for no concept or an unknown kind.
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
        return expand_templates(concepts_l, None, n=variations, seed=seed, kind=kind)
    return concepts_l


def prompt_source(prompts: str | Sequence[str] | None = None, templates: str | Sequence[str] | None = None,
                  variations: int = 0) -> str:
    """Where :func:`build_prompts` takes the prompts from: ``"user_prompts"``, ``"user_templates"``,
    ``"builtin_templates"`` or ``"bare_concepts"`` (recorded in ``metadata.json``)."""
    if parse_prompt_lines(prompts):
        return "user_prompts"
    if parse_prompt_lines(templates):
        return "user_templates"
    return "builtin_templates" if variations and variations > 0 else "bare_concepts"
