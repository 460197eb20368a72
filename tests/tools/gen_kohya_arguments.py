"""Regenerate ``training/lora/kohya_arguments.json``: every argument name kohya-ss/sd-scripts' ``train_network.py``
parser accepts, every ``[[datasets]]`` / ``[[datasets.subsets]]`` key its dataset-config schema accepts, and every
``network_args`` key ``networks/lora.py`` reads, plus what ``flux_train_network.py`` adds (its parser and
``networks/lora_flux.py``'s ``network_args``) — read from kohya's own source with :mod:`ast` (nothing of
sd-scripts is imported or copied; only names, defaults and line numbers are recorded).

Usage::

    python tests/tools/gen_kohya_arguments.py /path/to/sd-scripts [--out training/lora/kohya_arguments.json]

The sd-scripts checkout can come from ``fetch github:kohya-ss/sd-scripts`` (a bare git dir works too: pass
``--git-dir DIR`` and the files are read with ``git show HEAD:<path>``).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

# the functions train_network.setup_parser() calls, in order, with the files they live in
PARSER_FUNCS = [
    ("library/utils.py", "add_logging_arguments"),
    ("library/train_util.py", "add_sd_models_arguments"),
    ("library/sai_model_spec.py", "add_model_spec_arguments"),
    ("library/train_util.py", "add_dataset_arguments"),
    ("library/train_util.py", "add_training_arguments"),
    ("library/train_util.py", "add_masked_loss_arguments"),
    ("library/deepspeed_utils.py", "add_deepspeed_arguments"),
    ("library/train_util.py", "add_optimizer_arguments"),
    ("library/config_util.py", "add_config_arguments"),
    ("library/custom_train_functions.py", "add_custom_train_arguments"),
    ("train_network.py", "setup_parser"),
]

# what flux_train_network.setup_parser() adds on top of train_network's parser (Flux.1 LoRA training)
FLUX_PARSER_FUNCS = [
    ("library/train_util.py", "add_dit_training_arguments"),
    ("library/flux_train_utils.py", "add_flux_train_arguments"),
    ("flux_train_network.py", "setup_parser"),
]


def _reader(root: Path | None, git_dir: Path | None):
    def read(path: str) -> str:
        if git_dir is not None:
            return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"], check=True,
                                  capture_output=True, text=True).stdout
        return (root / path).read_text(encoding="utf-8")
    return read


def _const(node):
    try:
        return ast.literal_eval(node)
    except Exception:  # noqa: BLE001 - non-literal defaults are recorded as source text
        return {"expr": ast.unparse(node)}


def parser_arguments(read, funcs=None) -> list[dict]:
    out = []
    for path, func in (funcs or PARSER_FUNCS):
        tree = ast.parse(read(path))
        fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func)
        for call in ast.walk(fn):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "add_argument"):
                continue
            flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            long = [f for f in flags if f.startswith("--")]
            if not long:
                continue
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            dest = _const(kw["dest"]) if "dest" in kw else long[0][2:].replace("-", "_")
            rec = {"name": dest, "source": f"{path}:{call.lineno}", "function": func}
            if "type" in kw:
                rec["type"] = ast.unparse(kw["type"])
            if "action" in kw:
                rec["action"] = _const(kw["action"])
            if "nargs" in kw:
                rec["nargs"] = _const(kw["nargs"])
            if "default" in kw:
                rec["default"] = _const(kw["default"])
            if "choices" in kw:
                rec["choices"] = _const(kw["choices"])
            out.append(rec)
    return sorted({r["name"]: r for r in out}.values(), key=lambda r: r["name"])


def dataset_config_keys(read) -> dict[str, list[str]]:
    tree = ast.parse(read("library/config_util.py"))
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ConfigSanitizer")
    out: dict[str, list[str]] = {}
    for node in cls.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and node.targets[0].id.endswith("SCHEMA")):
            name = node.targets[0].id
            keys = []
            for k in node.value.keys:
                if isinstance(k, ast.Constant):
                    keys.append(k.value)
                elif isinstance(k, ast.Call) and k.args:  # Required("image_dir")
                    keys.append(k.args[0].value)
            out[name] = sorted(keys)
    return out


def network_args_keys(read, path: str = "networks/lora.py") -> list[str]:
    tree = ast.parse(read(path))
    keys = set()
    for call in ast.walk(tree):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "get"
                and isinstance(call.func.value, ast.Name) and call.func.value.id in ("kwargs", "nw_kwargs")
                and call.args and isinstance(call.args[0], ast.Constant)):
            keys.add(call.args[0].value)
    return sorted(keys)


def metadata_keys(read) -> dict[str, list[str]]:
    """``ss_*`` keys train_network.py writes (string constants in ``NetworkTrainer.train``) and the modelspec
    fields of ``library/sai_model_spec.py`` ``ModelSpecMetadata``."""
    tree = ast.parse(read("train_network.py"))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train")
    ss = sorted({n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and n.value.startswith("ss_") and " " not in n.value})
    tree = ast.parse(read("library/sai_model_spec.py"))
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ModelSpecMetadata")
    ms = [f"modelspec.{n.target.id}" for n in cls.body if isinstance(n, ast.AnnAssign)
          and n.target.id != "additional_fields"]
    return {"ss": ss, "modelspec": ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", help="sd-scripts checkout")
    ap.add_argument("--git-dir", help="bare git dir of sd-scripts (read HEAD)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "training" / "lora"
                                         / "kohya_arguments.json"))
    a = ap.parse_args(argv)
    if not a.root and not a.git_dir:
        ap.error("give the sd-scripts checkout or --git-dir")
    read = _reader(Path(a.root) if a.root else None, Path(a.git_dir) if a.git_dir else None)
    commit = ""
    if a.git_dir:
        commit = subprocess.run(["git", f"--git-dir={a.git_dir}", "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    doc = {"source": "kohya-ss/sd-scripts", "commit": commit, "generator": "tests/tools/gen_kohya_arguments.py",
           "train_network_arguments": parser_arguments(read),
           "dataset_config_schemas": dataset_config_keys(read),
           "lora_network_args": network_args_keys(read),
           "flux_train_network_arguments": [r for r in parser_arguments(read, FLUX_PARSER_FUNCS)
                                            if r["name"] not in {x["name"] for x in parser_arguments(read)}],
           "lora_flux_network_args": network_args_keys(read, "networks/lora_flux.py"),
           "metadata_keys": metadata_keys(read)}
    Path(a.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {a.out}: {len(doc['train_network_arguments'])} arguments, "
          f"{sum(len(v) for v in doc['dataset_config_schemas'].values())} dataset keys, "
          f"{len(doc['lora_network_args'])} network_args keys", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
