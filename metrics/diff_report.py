"""Markdown rendering of weight-diff reports (:mod:`.weight_diff`) and of report comparisons.

Plain string formatting: tables are GitHub-flavoured Markdown, numbers in 3-significant-digit scientific
notation, shares in percent, ratios as ``2.7×``.
"""

from __future__ import annotations

import math
from typing import Mapping


def _e(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _int(x) -> str:
    return "–" if x is None else f"{int(x):,}"


def fmt_ratio(r) -> str:
    """``2.7×`` style ratio (``–`` for None, ``∞`` for inf, ``0×`` for 0; 2 significant digits below 10, else
    rounded to an integer)."""
    if r is None:
        return "–"
    if math.isinf(r):
        return "∞"
    if r == 0:
        return "0×"
    return f"{r:.2g}×" if r < 10 else f"{r:.0f}×"


_GROUP_COLS = (
    ("params", "params", _int),
    ("param_share", "param share", _pct),
    ("change_share", "share of Σ|Δ|", _pct),
    ("mean_abs", "mean |Δ| (all params)", _e),
    ("mean_abs_changed", "mean |Δ| (changed tensors only)", _e),
    ("max_abs", "max |Δ|", _e),
    ("std", "std Δ", _e),
    ("rel_change", "‖Δ‖/‖W‖", _e),
    ("cosine", "cosine", lambda x: "–" if x is None else f"{x:.6f}"),
    ("frac_changed", "elements changed", _pct),
)


def _group_table(groups: Mapping[str, Mapping], first: str, sort_by_change: bool = False) -> list[str]:
    hdr = [first] + [c[1] for c in _GROUP_COLS] + ["tensors changed"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    items = list(groups.items())
    if sort_by_change:
        items.sort(key=lambda kv: kv[1].get("mean_abs", 0.0), reverse=True)
    for name, g in items:
        row = [f"`{name}`"] + [fn(g.get(k)) for k, _, fn in _GROUP_COLS]
        row.append(f"{g.get('changed_tensors', 0)}/{g.get('tensors', 0)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def report_markdown(report: Mapping, top_n: int = 10, max_blocks: int | None = None) -> str:
    """Render a diff report as Markdown: summary, overall / layer type / block / component tables, top tensors,
    keys on one side only, notes.

    Args:
        report: dict from :func:`conceptlab.metrics.weight_diff.diff_files` / ``diff_pairs``.
        top_n: rows of the most-changed-tensors table.
        max_blocks: limit the block table (None: all).
    """
    a, b = report.get("a") or {}, report.get("b") or {}
    ov = report["overall"]
    out = [f"# Weight diff: {a.get('name', 'A')} → {b.get('name', 'B')}", ""]
    out.append(f"- mode: **{report.get('mode')}**, architecture: **{report.get('arch')}**")
    out.append(f"- A: `{a.get('name', '?')}` ({a.get('kind', '?')}, dtype {a.get('file_dtype') or a.get('dtype')})")
    out.append(f"- B: `{b.get('name', '?')}` ({b.get('kind', '?')}, dtype {b.get('file_dtype') or b.get('dtype')})")
    out.append(f"- tensors compared: {ov['tensors']:,} ({report.get('changed_tensors', 0):,} changed, "
               f"{report.get('identical_tensors', 0):,} identical); parameters: {ov['params']:,} "
               f"({ov['changed_params']:,} in changed tensors)")
    out.append(f"- **mean |Δ| over the whole model: {_e(ov['mean_abs'])}**; over changed tensors only: "
               f"{_e(ov['mean_abs_changed'])}; max |Δ| {_e(ov['max_abs'])}; std Δ {_e(ov['std'])}; "
               f"‖Δ‖/‖W‖ {_e(ov['rel_change'])}; elements changed (|Δ| > {report.get('tolerance', 0):g}): "
               f"{_pct(ov['frac_changed'])}")
    if report.get("below_resolution"):
        out.append(f"- changes below the dtype's resolution: {report['below_resolution']:,} elements")
    nf = report.get("nonfinite") or {}
    if nf.get("a") or nf.get("b"):
        out.append(f"- **NaN/Inf**: A {sum(nf.get('a', {}).values()):,} elements, "
                   f"B {sum(nf.get('b', {}).values()):,} elements (excluded from statistics)")
    for side, label in (("only_in_a", "A"), ("only_in_b", "B")):
        keys = report.get(side) or []
        if keys:
            out.append(f"- {len(keys):,} tensors only in {label}: " + ", ".join(f"`{k}`" for k in keys[:3])
                       + (" …" if len(keys) > 3 else ""))
    out.append("")
    for note in report.get("notes") or []:
        out.append(f"> {note}")
        out.append("")
    out.append("## By layer type (sorted by mean |Δ|)")
    out.extend(_group_table(report.get("by_layer_type") or {}, "layer type", sort_by_change=True))
    out.append("")
    out.append("## By block")
    blocks = dict(list((report.get("by_block") or {}).items())[: max_blocks or None])
    out.extend(_group_table(blocks, "block"))
    out.append("")
    out.append("## By component")
    out.extend(_group_table(report.get("by_component") or {}, "component"))
    out.append("")
    top = (report.get("top_tensors") or [])[:top_n]
    if top:
        out.append(f"## Top {len(top)} changed tensors (by mean |Δ|)")
        out.append("| tensor | layer type | block | mean |Δ| | max |Δ| | ‖Δ‖/‖W‖ |")
        out.append("|---|---|---|---|---|---|")
        for t in top:
            out.append(f"| `{t['key']}` | {t['layer_type']} | {t.get('block') or '–'} | {_e(t['mean_abs'])} | "
                       f"{_e(t['max_abs'])} | {_e(t.get('rel_change'))} |")
        out.append("")
    rk = report.get("rank")
    if rk:
        ranks = [t for t in report.get("tensors") or [] if t.get("effective_rank") is not None]
        if ranks:
            out.append(f"## Effective rank of ΔW ({int(rk['energy'] * 100)} % energy; {rk['computed']} computed, "
                       f"{rk['skipped_time_budget']} skipped)")
            out.append("| tensor | shape | effective rank |")
            out.append("|---|---|---|")
            for t in sorted(ranks, key=lambda t: t["mean_abs"], reverse=True)[:top_n]:
                r = f">{t['effective_rank']}" if t.get("effective_rank_lower_bound") else str(t["effective_rank"])
                out.append(f"| `{t['key']}` | {tuple(t['shape'])} | {r} |")
            out.append("")
    return "\n".join(out)


def compare_markdown(cmp: Mapping, sections: tuple[str, ...] = ("by_component", "by_layer_type", "by_block"),
                     metrics: tuple[str, ...] | None = None) -> str:
    """Render :func:`conceptlab.metrics.weight_diff.compare_reports` output: one ratio table per section
    (rows = groups, columns = metrics, cells ``r2/r1`` as ``2.7×``)."""
    metrics = tuple(metrics or cmp.get("metrics") or ())
    l1, l2 = cmp.get("label1", "report 1"), cmp.get("label2", "report 2")
    out = [f"# Weight-diff comparison: {l2} vs {l1}", "",
           f"Ratios are **{l2} / {l1}** (2.7× = the second report's change is 2.7 times the first's).", ""]
    for note in cmp.get("notes") or []:
        out += [f"> {note}", ""]
    ov = cmp["overall"]
    out.append("## Overall")
    out.append(f"| metric | {l1} | {l2} | ratio |")
    out.append("|---|---|---|---|")
    for m in metrics:
        c = ov.get(m) or {}
        out.append(f"| {m} | {_e(c.get('r1'))} | {_e(c.get('r2'))} | **{fmt_ratio(c.get('ratio'))}** |")
    out.append("")
    for sec in sections:
        groups = cmp.get(sec) or {}
        if not groups:
            continue
        out.append(f"## {sec.replace('by_', 'By ').replace('_', ' ')} (ratio {l2} / {l1})")
        out.append("| group | " + " | ".join(metrics) + " |")
        out.append("|---|" + "---|" * len(metrics))
        for g, row in groups.items():
            out.append(f"| `{g}` | " + " | ".join(fmt_ratio((row.get(m) or {}).get("ratio")) for m in metrics) + " |")
        out.append("")
        for side, lab in (("only_in_1", l1), ("only_in_2", l2)):
            miss = (cmp.get(side) or {}).get(sec) or []
            if miss:
                out.append(f"Groups only in {lab}: " + ", ".join(f"`{m}`" for m in miss))
                out.append("")
    return "\n".join(out)
