"""Regenerate ``tests/data/merge_block_tables.json``: the merge block (IN00 … OUT11) that supermerger and sd-mecha give
every SD1.5 / SDXL UNet key, read from their own code.

    python tests/tools/merge_block_tables.py --sd-mecha /path/to/sd-mecha \\
        --supermerger /path/to/sd-webui-supermerger [--out tests/data/merge_block_tables.json]

Both arguments are git directories of the references (as the ``fetch`` tool leaves them) or work trees.
Nothing is copied from them into the repo except the resulting table (key -> block id):

* the key lists are sd-mecha's model configs ``sd1-ldm.yaml`` / ``sdxl-sgm.yaml`` (every key of a full SD1.5 /
  SDXL single-file checkpoint), keys under ``model.diffusion_model.``;
* supermerger's block is the second value of ``blockfromkey(key, isxl)`` in ``scripts/mergers/mergers.py`` (the
  id its block-weight list is indexed by), evaluated by compiling that function and the ``BLOCKID*`` tables from
  the file (no A1111 needed);
* sd-mecha's block is what ``map_keys`` of ``convert_sd1_blocks_to_ldm`` / ``convert_sdxl_blocks_to_sgm``
  (``sd_mecha/extensions/builtin/model_configs/convert_sd{1,xl}_blocks.py``) assigns, evaluated the same way with
  stand-ins for sd-mecha's config objects.

``tests/test_merge_blocks.py`` checks :func:`conceptlab.formats.keys.classify_key` against the table.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "merge_block_tables.json"
PREFIX = "model.diffusion_model."


def _read(repo: Path, path: str) -> tuple[str, str]:
    """``(text, commit)`` of ``path`` in ``repo`` (a bare git dir or a work tree)."""
    if (repo / path).is_file():
        text = (repo / path).read_text()
    else:
        text = subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], check=True,
                              capture_output=True, text=True).stdout
    gd = repo if not (repo / ".git").exists() else repo / ".git"
    commit = subprocess.run(["git", "--git-dir", str(gd), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return text, commit


def _compile(source: str, names: set[str], filename: str) -> dict:
    """Execute only the top-level assignments / functions / classes named in ``names`` of ``source``."""
    tree = ast.parse(source, filename)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            node.decorator_list = []
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            keep.append(node)
    ns: dict = {"re": re}
    exec(compile(ast.Module(body=keep, type_ignores=[]), filename, "exec"), ns)  # noqa: S102 - reference code
    return ns


def unet_keys(mecha: Path, config: str) -> tuple[list[str], str]:
    import yaml

    text, commit = _read(mecha, f"sd_mecha/extensions/builtin/model_configs/{config}.yaml")
    data = yaml.safe_load(text)
    keys = [k for comp in data["components"].values() for k in comp if k.startswith(PREFIX)]
    return keys, commit


def supermerger_blocks(sm: Path, keys: list[str], isxl: bool) -> tuple[dict[str, str], str]:
    path = "scripts/mergers/mergers.py"
    text, commit = _read(sm, path)
    ns = _compile(text, {"blockfromkey", "BLOCKID", "BLOCKIDXL", "BLOCKIDXLL", "BLOCKIDXLLL", "BLOCKIDFLUX"}, path)
    return {k: ns["blockfromkey"](k, isxl)[1] for k in keys}, commit


class _Keys(list):
    def keys(self):
        return self


class _Recorder(dict):
    """Stands in for sd-mecha's key-relation builder: ``b[out] = b.keys[in]`` records ``out -> in``."""

    class _Ids:
        def __getitem__(self, name):
            return name

    keys = _Ids()


def mecha_blocks(mecha: Path, keys: list[str], arch: str) -> tuple[dict[str, str], str]:
    mod = {"sd1": "convert_sd1_blocks", "sdxl": "convert_sdxl_blocks"}[arch]
    cls = {"sd1": "convert_sd1_blocks_to_ldm", "sdxl": "convert_sdxl_blocks_to_sgm"}[arch]
    cfg = {"sd1": "sd1_ldm_config", "sdxl": "sdxl_sgm_config"}[arch]
    path = f"sd_mecha/extensions/builtin/model_configs/{mod}.py"
    text, commit = _read(mecha, path)
    ns = _compile(text, {"re_inp", "re_mid", "re_out", cls}, path)
    ns[cls].map_keys.__globals__[cfg] = _Keys(keys)
    rec = _Recorder()
    ns[cls].map_keys(rec)
    return {k: rec[k] for k in keys}, commit


def build(mecha: Path, sm: Path) -> dict:
    out = {"_about": "block id per UNet key (prefix model.diffusion_model. omitted), grouped as "
                     "'<supermerger block>|<sd-mecha block>': [keys]. Regenerate with tests/tools/merge_block_tables.py."}
    for arch, config in (("sd1", "sd1-ldm"), ("sdxl", "sdxl-sgm")):
        keys, mecha_commit = unet_keys(mecha, config)
        smb, sm_commit = supermerger_blocks(sm, keys, arch == "sdxl")
        mb, _ = mecha_blocks(mecha, keys, arch)
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(f"{smb[k]}|{mb[k]}", []).append(k[len(PREFIX):])
        out[arch] = {"sources": {"sd-mecha": f"ljleb/sd-mecha@{mecha_commit} {config}.yaml",
                                 "supermerger": f"hako-mikan/sd-webui-supermerger@{sm_commit}"},
                     "n_keys": len(keys), "blocks": dict(sorted(groups.items()))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sd-mecha", required=True, type=Path)
    ap.add_argument("--supermerger", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    table = build(args.sd_mecha, args.supermerger)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    for arch in ("sd1", "sdxl"):
        print(arch, table[arch]["n_keys"], "keys;", "groups:",
              {g: len(v) for g, v in table[arch]["blocks"].items() if g.split("|")[0] != g.split("|")[1]},
              "(disagreements)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
