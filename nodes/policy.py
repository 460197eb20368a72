"""The one path and input policy for every Concept Lab node (``/prompt`` is reachable over the network).

Anyone who can reach ComfyUI's ``/prompt`` can queue our nodes with any input. This module decides what such a
client may name and send:

* **Paths** (:func:`check_name`, :func:`confine`, :func:`check_inside`): every node input that names a file or
  folder is a relative name inside ComfyUI's input / output / models folders — no absolute path, drive letter,
  ``..`` segment, backslash, NUL or control character, no percent- or Unicode-encoded variant of those, at most
  :data:`MAX_COMPONENT_CHARS` per segment and :data:`MAX_PATH_CHARS` in all — and it is checked again *after*
  symlinks are resolved: a symlink whose target leaves the allowed root is refused for reads and for writes.
* **Paths inside TOML strings** (:func:`refuse_toml_path_keys`): kohya keys that name files or folders
  (:data:`TOML_PATH_KEYS`, at any section depth, e.g. ``[[datasets.subsets]] image_dir``) and unknown keys whose
  names look like paths (:data:`PATH_KEY_SUFFIXES`) are refused by name in the node; the CLI, which a local user
  runs, keeps them.
* **Widget values** (:func:`validate_inputs`, :func:`guarded`): FLOAT widgets finite (ComfyUI's own check lets NaN
  through) and within ``min``/``max``, strings bounded (:data:`MAX_WIDGET_CHARS`), path-naming inputs (a node's
  ``PATH_INPUTS``) safe, plus the node's ``check_inputs`` (TOML, prompt counts) — as ComfyUI's ``VALIDATE_INPUTS``
  (``/prompt`` answers HTTP 400; INT bounds and combos keep ComfyUI's own typed errors) and again, for every
  input, when the node runs (a linked value is not known at validation time).

Numeric bounds inside TOML/JSON strings are the host-neutral :mod:`conceptlab.formats.limits`.
No library fits: ComfyUI itself only checks ``min``/``max`` (NaN passes) and ``folder_paths`` has no policy for
names inside strings; pathvalidate checks file-name syntax but not roots, symlinks or kohya keys.
"""

from __future__ import annotations

import functools
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

#: longest single path segment (most file systems allow 255 bytes)
MAX_COMPONENT_CHARS = 200
#: longest relative name a node accepts
MAX_PATH_CHARS = 1024
#: deepest relative name (segments)
MAX_PATH_SEGMENTS = 16
#: string widget sizes (characters): single-line, multiline, ``forceInput`` (values from other nodes)
MAX_WIDGET_CHARS = {"line": 64 * 1024, "multiline": 1024 * 1024, "linked": 64 * 1024 * 1024}

#: kohya sd-scripts keys (train_network.py / train_util.py / config_util.py arguments and dataset-config keys)
#: that name files or folders. None of them has a safe meaning inside ComfyUI: the dataset comes from the LoRA
#: Dataset node (input/), files go to output/, models come connected. Checked at any section depth.
TOML_PATH_KEYS = frozenset({
    "output_dir", "logging_dir", "state_dir", "sample_dir", "train_data_dir", "reg_data_dir", "image_dir",
    "conditioning_data_dir", "metadata_file", "in_json", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
    "network_weights", "base_weights", "resume", "dataset_config", "config_file", "output_config", "sample_prompts",
    "log_tracker_config", "cache_dir", "text_encoder", "clip_l", "clip_g", "t5xxl", "ae", "vae_path",
    "deepspeed_config", "controlnet_model_name_or_path", "teacher_model", "caption_dir", "tokenizer", "log_config_path",
    "dataset_class", "network_module_path", "save_model_as_path", "sample_prompts_file",
})
#: unknown keys whose names end like these and whose value is text are treated as paths too
PATH_KEY_SUFFIXES = ("_dir", "_dirs", "_path", "_paths", "_file", "_files", "_weights", "_config", "_folder",
                     "_json", "_model", "_checkpoint", "_ckpt")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


class PathOutsideError(ValueError):
    """A node input named a path outside the folder it must stay in (or a name that is not a plain name)."""


# -------------------------------------------------------------------------------------------------------------
# names and paths
# -------------------------------------------------------------------------------------------------------------

def _syntax_problem(text: str, subfolders: bool) -> str | None:
    if "\x00" in text:
        return "contains a NUL character"
    if _CONTROL.search(text):
        return "contains a control character"
    if "\\" in text:
        return "contains a backslash (use '/' between folders)"
    if text.startswith("/") or text.startswith("~") or _DRIVE.match(text):
        return "is an absolute path"
    if ":" in text:
        return "contains ':' (drive letters and alternate data streams are not names)"
    if len(text) > MAX_PATH_CHARS:
        return f"is longer than {MAX_PATH_CHARS} characters"
    parts = text.split("/")
    if not subfolders and len(parts) > 1:
        return "must be a plain name without '/'"
    if len(parts) > MAX_PATH_SEGMENTS:
        return f"has more than {MAX_PATH_SEGMENTS} folder levels"
    for part in parts:
        if part in ("..",):
            return "contains a '..' segment"
        if len(part) > MAX_COMPONENT_CHARS:
            return f"has a segment longer than {MAX_COMPONENT_CHARS} characters"
        if part != part.strip() and part.strip() in ("", ".", ".."):
            return "has a blank segment"
    return None


def check_name(text: Any, what: str = "name", *, subfolders: bool = True, allow_empty: bool = False) -> str:
    """Check that ``text`` is a safe relative name; return it stripped, with ``./`` and empty segments removed.

    Refused (``PathOutsideError``, a ``ValueError``): non-text, empty (unless ``allow_empty``), absolute paths
    (``/x``, ``~``, ``C:``), ``..`` segments, backslashes, NUL / control characters, ``:``, more than
    :data:`MAX_PATH_SEGMENTS` segments or :data:`MAX_PATH_CHARS` characters, a segment over
    :data:`MAX_COMPONENT_CHARS`, ``/`` when ``subfolders`` is False — and the same after percent-decoding and
    Unicode NFKC normalisation (``%2e%2e%2f``, fullwidth ``．．／``), since other layers may decode them.
    """
    if not isinstance(text, str):
        raise PathOutsideError(f"{what} must be text, got {type(text).__name__}")
    raw = text.strip()
    if not raw:
        if allow_empty:
            return ""
        raise PathOutsideError(f"{what} is empty")
    for variant in dict.fromkeys((raw, unquote(raw), unicodedata.normalize("NFKC", raw),
                                  unicodedata.normalize("NFKC", unquote(raw)))):
        problem = _syntax_problem(variant, subfolders)
        if problem:
            shown = raw if len(raw) <= 80 else raw[:77] + "..."
            raise PathOutsideError(f"{what} {shown!r} {problem}; give a name inside ComfyUI's folders")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts:
        raise PathOutsideError(f"{what} {raw!r} names no file")
    return "/".join(parts)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(base: str | os.PathLike, relative: Any, what: str = "path", *, allow_root: bool = False) -> Path:
    """``base / relative`` after :func:`check_name`, resolved through symlinks, refused unless inside ``base``.

    A symlink anywhere on the way whose target leaves ``base`` (existing or dangling, for reads and writes) is
    refused. ``allow_root``: ``relative`` may be empty / ``"."`` and name ``base`` itself.
    Raises ``PathOutsideError``.
    """
    root = Path(base).resolve()
    if allow_root and isinstance(relative, str) and relative.strip() in ("", "."):
        return root
    rel = check_name(relative, what)
    candidate = Path(os.path.realpath(root / rel))
    if not _inside(candidate, root):
        raise PathOutsideError(f"{what} {rel!r} leads outside {root.name}/ (through a symlink)")
    return candidate


def check_inside(path: str | os.PathLike, base: str | os.PathLike, what: str = "file") -> Path:
    """Refuse a file found by scanning ``base`` (a dataset image, a caption) that resolves outside ``base``
    through a symlink. Returns the resolved path. Raises ``PathOutsideError``."""
    root = Path(base).resolve()
    real = Path(os.path.realpath(path))
    if not _inside(real, root):
        raise PathOutsideError(f"{what} {Path(path).name!r} is a symlink leading outside {root.name}/; "
                               f"copy the file into the folder instead")
    return real


def check_tree(base: str | os.PathLike, paths: Iterable[str | os.PathLike], what: str = "file") -> None:
    """:func:`check_inside` for every path in ``paths`` (e.g. all images and caption files of a dataset)."""
    for p in paths:
        check_inside(p, base, what)


def check_folder(root: str | os.PathLike, base: str | os.PathLike, what: str = "file", depth: int = 2,
                 max_entries: int = 200_000) -> None:
    """Refuse ``root`` if it, or any entry up to ``depth`` levels below it (a kohya dataset: subset folders and
    their images and captions), resolves outside ``base`` through a symlink — checked before anything is read.
    Raises ``PathOutsideError``; ``ValueError`` above ``max_entries`` entries."""
    check_inside(root, base, what)
    level, seen = [Path(root)], 0
    for _ in range(depth):
        nxt = []
        for folder in level:
            with os.scandir(folder) as it:
                for entry in it:
                    seen += 1
                    if seen > max_entries:
                        raise ValueError(f"{Path(root).name}/ holds more than {max_entries} entries")
                    if entry.is_symlink():
                        check_inside(entry.path, base, what)
                    if entry.is_dir():
                        nxt.append(Path(entry.path))
        level = nxt


def reserve_run_name(lora_dir: str | os.PathLike, state_root: str | os.PathLike, name: str, *,
                     resume: bool = False, max_tries: int = 1000) -> tuple[str, Path]:
    """Claim ``name`` for a training run, so two runs never write each other's files.

    A name is free when ``<state_root>/<name>/`` does not exist and ``lora_dir`` holds no ``<name>.safetensors`` /
    ``<name>-*.safetensors``. The claim is ``mkdir`` of the state folder, which is atomic, so concurrent queue items
    (or two ComfyUI processes sharing the output folder) cannot both get it. A taken name gets ``_2``, ``_3``, …
    and a warning is logged (the node returns the file name it used). With ``resume`` the name is used as is
    (continuing that run). Returns ``(name, state folder)``. Raises ``PathOutsideError`` for an unsafe name and
    ``FileExistsError`` when ``max_tries`` names are taken.
    """
    import logging

    lora_dir, state_root = Path(lora_dir), Path(state_root)
    state_root.mkdir(parents=True, exist_ok=True)
    if resume:
        d = confine(state_root, name, "output_name")
        d.mkdir(parents=True, exist_ok=True)
        return name, d
    for i in range(1, max_tries + 1):
        cand = name if i == 1 else f"{name}_{i}"
        d = confine(state_root, cand, "output_name")
        if (lora_dir / f"{cand}.safetensors").exists() or any(lora_dir.glob(f"{glob_escape(cand)}-*.safetensors")):
            continue
        try:
            d.mkdir()
        except FileExistsError:
            continue
        if cand != name:
            logging.getLogger(__name__).warning("output_name %r is taken (files of an earlier run in %s); this run "
                                                "saves as %r. Turn on resume to continue the earlier run.", name,
                                                lora_dir, cand)
        return cand, d
    raise FileExistsError(f"output_name {name!r}: {max_tries} numbered names are taken; choose another name")


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped (:func:`glob.escape`)."""
    import glob

    return glob.escape(text)


# -------------------------------------------------------------------------------------------------------------
# path keys inside TOML / JSON strings
# -------------------------------------------------------------------------------------------------------------

def is_path_key(key: str, value: Any) -> bool:
    """True when ``key`` names a file or folder: a :data:`TOML_PATH_KEYS` key with a non-empty value, or any key
    ending in one of :data:`PATH_KEY_SUFFIXES` whose value is text (or a list of texts)."""
    if value is None or value is False or value == "" or value == []:
        return False
    k = str(key).strip().lower().replace("-", "_")
    if k in TOML_PATH_KEYS:
        return True
    texty = isinstance(value, str) or (isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value))
    return texty and k.endswith(PATH_KEY_SUFFIXES)


def find_path_keys(data: Any) -> list[str]:
    """Dotted locations of every path-like key in a parsed TOML / JSON document, at any depth (tables, arrays of
    tables such as ``datasets[0].subsets[1].image_dir``). Iterative."""
    found: list[str] = []
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, Mapping):
            for k, v in node.items():
                loc = f"{where}.{k}" if where else str(k)
                if is_path_key(k, v):
                    found.append(loc)
                elif isinstance(v, (Mapping, list, tuple)):
                    stack.append((v, loc))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                if isinstance(v, (Mapping, list, tuple)):
                    stack.append((v, f"{where}[{i}]"))
    return sorted(found)


_KEY_HINTS = {
    "resume": "use the node's resume switch (it resumes this output_name from output/conceptlab_training/)",
    "sample_prompts": "write the prompts into the sample_prompts box",
    "network_weights": "load the LoRA with a LoRA loader before training, or resume",
    "train_data_dir": "use the LoRA Dataset node (a folder inside ComfyUI's input/)",
    "image_dir": "use the LoRA Dataset node (a folder inside ComfyUI's input/)",
    "dataset_config": "use the LoRA Dataset node (a folder inside ComfyUI's input/)",
    "pretrained_model_name_or_path": "connect the model with a loader node",
    "vae": "connect the VAE with a loader node",
}


#: TOML keys that name *input* folders/files a node may read, as safe relative names resolved inside ComfyUI's
#: input folder (symlinks checked when resolved): kohya ``[[datasets.subsets]] image_dir``, ``reg_data_dir`` and a
#: ``dataset_config`` file, so a kohya dataset config with regularization images works in the node
INPUT_FOLDER_KEYS = frozenset({"image_dir", "reg_data_dir", "dataset_config"})


def _leaf_value(data: Any, loc: str) -> Any:
    node = data
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", loc):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node


def refuse_toml_path_keys(data: Any, where: str = "kohya_toml", input_keys: Iterable[str] = ()) -> None:
    """Raise ``PathOutsideError`` naming every path-like key in ``data`` (see :func:`find_path_keys`).

    Node inputs cannot name files through a TOML string: output goes to ComfyUI's output folder, the dataset comes
    from the dataset node and models come connected. The CLI keeps these keys. Keys in ``input_keys`` (e.g.
    :data:`INPUT_FOLDER_KEYS`) are allowed when their value is a safe relative name (:func:`check_name`); the
    caller resolves them inside ComfyUI's input folder.
    """
    allowed = frozenset(input_keys)
    keys = []
    for loc in find_path_keys(data):
        leaf = loc.rsplit(".", 1)[-1].split("[")[0]
        if leaf in allowed:
            check_name(_leaf_value(data, loc), f"{where}: {loc}")
            continue
        keys.append(loc)
    if not keys:
        return
    hints = sorted({_KEY_HINTS[k.rsplit(".", 1)[-1].split("[")[0]] for k in keys
                    if k.rsplit(".", 1)[-1].split("[")[0] in _KEY_HINTS})
    raise PathOutsideError(
        f"{where}: {', '.join(keys)} name files or folders, which a node cannot accept (anyone who can reach "
        f"ComfyUI could read or write any file). Files go to ComfyUI's output folder under output_name"
        + (f"; {'; '.join(hints)}" if hints else "") + ". The Concept Lab CLI accepts these keys.")


# -------------------------------------------------------------------------------------------------------------
# widget values (ComfyUI VALIDATE_INPUTS and the same check when the node runs)
# -------------------------------------------------------------------------------------------------------------

def _spec_items(cls) -> Iterable[tuple[str, Any, dict]]:
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            typ = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            yield name, typ, opts


def input_errors(cls, values: Mapping[str, Any], combos: bool = True) -> list[ValueError]:
    """Problems with ``values`` (as ``ValueError`` instances: ``PathOutsideError``, ``LimitError``, ...) against ``cls.INPUT_TYPES()`` and ``cls.PATH_INPUTS``; ``[]`` when all is well.

    ``None`` (a linked input not known yet) is skipped. INT/FLOAT: a number (not bool), finite, within
    ``min``/``max``; combos (when ``combos``): in the list; STRING: at most :data:`MAX_WIDGET_CHARS` (by kind); names in
    ``PATH_INPUTS`` (``{input: "subfolders" | "plain" | "optional" | "lines"}``; ``lines``: one name per line)
    pass :func:`check_name`; then the node's own ``check_inputs(values)`` staticmethod, if any (a ``ValueError``
    it raises becomes a problem) — e.g. the path keys and bounds inside a ``kohya_toml`` widget.
    """
    problems: list[ValueError] = []
    path_inputs: Mapping[str, str] = getattr(cls, "PATH_INPUTS", {}) or {}
    for name, typ, opts in _spec_items(cls):
        if name not in values or values[name] is None:
            continue
        v = values[name]
        if typ in ("INT", "FLOAT"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(ValueError(f"{name} must be a number, got {v!r}"))
                continue
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(ValueError(f"{name} must be a finite number, got {v!r}"))
                continue
            lo, hi = opts.get("min"), opts.get("max")
            if lo is not None and v < lo:
                problems.append(ValueError(f"{name} = {v!r} is smaller than the minimum {lo}"))
            elif hi is not None and v > hi:
                problems.append(ValueError(f"{name} = {v!r} is bigger than the maximum {hi}"))
        elif isinstance(typ, (list, tuple)):
            if combos and typ and v not in typ:
                shown = list(typ) if len(typ) <= 20 else f"a list of {len(typ)} names"
                problems.append(ValueError(f"{name}: {v!r} is not one of {shown}"))
        elif typ == "STRING":
            if not isinstance(v, str):
                problems.append(ValueError(f"{name} must be text"))
                continue
            kind = "linked" if opts.get("forceInput") else "multiline" if opts.get("multiline") else "line"
            limit = MAX_WIDGET_CHARS[kind]
            if len(v) > limit:
                problems.append(ValueError(f"{name} is {len(v)} characters; at most {limit} are accepted"))
                continue
        if name in path_inputs:
            mode = path_inputs[name]
            try:
                for item in ([ln for ln in v.splitlines() if ln.strip()] if mode == "lines" else [v]):
                    check_name(item, name, subfolders=mode != "plain", allow_empty=mode == "optional")
            except PathOutsideError as exc:
                problems.append(exc)
    extra = getattr(cls, "check_inputs", None)  # node-specific checks of widget text (TOML, prompt counts, ...)
    if extra is not None and not problems:
        try:
            extra({k: v for k, v in values.items() if v is not None})
        except ValueError as exc:
            problems.append(exc)
        except RecursionError:
            problems.append(ValueError("an input is nested too deeply"))
    return problems


def input_problems(cls, values: Mapping[str, Any], combos: bool = True) -> list[str]:
    """:func:`input_errors` as messages; ``[]`` when all is well."""
    return [str(e) for e in input_errors(cls, values, combos)]


def validate_inputs(cls, values: Mapping[str, Any]) -> bool | str:
    """ComfyUI ``VALIDATE_INPUTS`` result: ``True``, or the problems as one message (``/prompt`` answers 400)."""
    problems = input_problems(cls, values)
    return True if not problems else "; ".join(problems)


class _Validator:
    """``VALIDATE_INPUTS`` of a guarded node: callable with the node's inputs, and with a signature naming only the
    inputs it checks itself (FLOAT and STRING widgets, ``PATH_INPUTS``, ``VALIDATE_ALSO``), computed when ComfyUI
    asks. ComfyUI skips its own ``min``/``max``/combo checks for exactly those names (execution.py
    ``validate_inputs``), so INT and combo inputs keep ComfyUI's typed errors (``value_bigger_than_max``,
    ``value_not_in_list``)."""

    def __init__(self, cls):
        self._cls = cls

    def names(self) -> list[str]:
        cls = self._cls
        extra = set(getattr(cls, "PATH_INPUTS", {}) or {}) | set(getattr(cls, "VALIDATE_ALSO", ()) or ())
        return [n for n, typ, _ in _spec_items(cls) if typ in ("FLOAT", "STRING") or n in extra]

    @property
    def __signature__(self):
        import inspect

        P = inspect.Parameter
        return inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in self.names()])

    def __call__(self, **kwargs):
        return validate_inputs(self._cls, kwargs)


def guarded(cls):
    """Class decorator: give a V1 node ``VALIDATE_INPUTS`` (see :func:`validate_inputs`, :class:`_Validator`) and
    re-check the same inputs when ``FUNCTION`` runs (raising the first problem's type: ``PathOutsideError``,
    ``LimitError`` or ``ValueError``), so values that arrive through links are bounded too. INT inputs named in
    ``VALIDATE_ALSO`` (used by the node's ``check_inputs``) are validated here as well.
    """
    cls.VALIDATE_INPUTS = _Validator(cls)
    fname = cls.FUNCTION
    original = getattr(cls, fname)

    @functools.wraps(original)
    def checked(self, *args, **kwargs):
        if args:  # positional call (tests): map onto the parameter names
            import inspect

            names = list(inspect.signature(original).parameters)[1:]
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        if getattr(cls, "INPUT_IS_LIST", False):  # ComfyUI passes every input as a list: check each element
            n = max((len(v) for v in kwargs.values() if isinstance(v, list)), default=1)
            errors = []
            for i in range(n):
                row = {k: (v[min(i, len(v) - 1)] if isinstance(v, list) and v else v) for k, v in kwargs.items()}
                errors += [e for e in input_errors(type(self), row, combos=False)
                           if str(e) not in {str(x) for x in errors}]
        else:
            errors = input_errors(type(self), kwargs, combos=False)  # names are resolved by the node itself
        if errors:  # the first error's type (PathOutsideError, LimitError, ...), every message
            raise type(errors[0])(f"{cls.__name__}: " + "; ".join(str(e) for e in errors))
        return original(self, **kwargs)

    setattr(cls, fname, checked)
    return cls
