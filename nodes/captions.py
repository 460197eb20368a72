"""ComfyUI node for the caption audit: a dataset folder inside ComfyUI's input directory -> report + table.

Thin adapter over :mod:`..metrics.captions`; ComfyUI is reached only through :mod:`.comfy_io` inside
functions, so this module imports without ComfyUI.
"""

from __future__ import annotations

import json

from ..metrics import caption_fix
from ..metrics import captions as cap
from . import policy


@policy.guarded
class ConceptLabCaptionAudit:
    """Audit the hex codes of a captioned pixel-art dataset folder in ComfyUI's input directory."""

    PATH_INPUTS = {"folder": "subfolders", "fix_to": "optional"}

    DESCRIPTION = (
        "Audits a captioned pixel-art dataset (a folder inside ComfyUI's input folder; flat or kohya "
        "'<repeats>_<name>' subfolders): duplicate, unlabelled and malformed hex codes, palette-list "
        "mismatches, colour words that contradict their hex, and caption colours missing from the image "
        "(measured on its native pixel grid). Outputs the JSON report and a table picture. Optionally writes "
        "corrected captions to a new folder under ComfyUI's output folder (never in place)."
    )
    CATEGORY = "Concept Lab/Captions"
    FUNCTION = "audit"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "table")
    OUTPUT_TOOLTIPS = (
        "The audit as JSON (schema conceptlab.caption_audit/1, see README): per-file findings with stable "
        "codes, and summary counts.",
        "A table of every file with its error / warning / info counts and finding codes.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {
                    "default": "pixel_art",
                    "tooltip": "Dataset folder, given relative to ComfyUI's input folder (e.g. 'pixel_art' "
                               "for input/pixel_art). Paths outside the input folder are refused.",
                }),
                "check_images": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Also open each caption's image: flags caption colours absent from it and "
                               "big image colours the caption never names (slower).",
                }),
                "tolerance": ("FLOAT", {
                    "default": cap.DEFAULT_TOLERANCE, "min": 0.5, "max": 50.0, "step": 0.1,
                    "tooltip": "ΔE00 within which a caption hex counts as present in the image "
                               "(1 ≈ just noticeable; 5 is the palette metrics' default).",
                }),
            },
            "optional": {
                "fix_to": ("STRING", {
                    "default": "",
                    "tooltip": "Leave empty to only audit. Otherwise a NEW folder name under ComfyUI's "
                               "output folder that receives corrected copies of the captions (and images); "
                               "the input folder is never changed.",
                }),
            },
        }

    def audit(self, folder, check_images=True, tolerance=cap.DEFAULT_TOLERANCE, fix_to=""):
        """Audit the captions of ``folder`` (a folder inside ComfyUI's input directory; kohya subfolders too).

        ``tolerance``: ΔE00 for "colour present in the image". ``fix_to``: optional new folder under ComfyUI's output
        directory for corrected captions (never in place). Returns ``(report JSON STRING, table IMAGE [1, H, W, 3])``;
        see :func:`conceptlab.metrics.captions.audit_folder`. Raises ``PathOutsideError`` for a path leaving the input
        folder, ``FileNotFoundError`` / ``NotAFolderError`` for a missing folder or a file.
        """
        from . import comfy_io

        root = comfy_io.resolve_input(folder)
        if not root.is_dir():
            raise cap.NotAFolderError(f"{folder!r} is a file; give a folder inside ComfyUI's input folder")
        policy.check_folder(root, comfy_io.input_dir(), "dataset file")  # no symlink out, before any read
        items = len(cap.scan_folder(root))
        progress = comfy_io.Progress(items * (2 if fix_to and fix_to.strip() else 1))
        report = cap.audit_folder(root, images=bool(check_images), tolerance=float(tolerance),
                                  progress=lambda done, total: progress.set(done))
        report["root"] = folder
        report["fix"] = None
        if fix_to and fix_to.strip():
            out = policy.confine(comfy_io.output_dir(), fix_to.strip(), "fix_to")
            fix = caption_fix.fix_folder(root, out, images=bool(check_images), copy_images=True,
                                 tolerance=float(tolerance),
                                 progress=lambda done, total: progress.set(items + done))
            fix["out_dir"] = fix_to.strip()
            report["fix"] = fix
        table = cap.render_table(report)
        return (json.dumps(report, indent=2, ensure_ascii=False), comfy_io.numpy_to_image([table]))


NODE_CLASS_MAPPINGS = {"ConceptLabCaptionAudit": ConceptLabCaptionAudit}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptLabCaptionAudit": "Caption Audit"}
