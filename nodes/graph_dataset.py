"""``ConceptLabLoraDatasetFromImages``: a LoRA dataset from images in the graph (an IMAGE batch, or a list of
IMAGEs of different sizes — e.g. ComfyUI's core Load Image Dataset from Folder / Load Image Dataset nodes, or any
edited images) plus captions, with the same buckets, caption processing and repeats as a kohya folder
(:mod:`conceptlab.training.lora.graph_dataset` writes them as one and scans it).

Core's ``LoadImageTextSetFromFolderNode`` returns captions already encoded (CONDITIONING); kohya caption
processing (shuffle, keep_tokens, dropout) needs the text, so connect its IMAGE output and give the captions here.
"""

from __future__ import annotations

from . import comfy_io, policy

CATEGORY = "Concept Lab/LoRA"
_SUBFOLDER = "conceptlab_datasets"


def _inputs() -> dict:
    from .lora import _caption_inputs, _dataset_inputs

    ds = {k: v for k, v in _dataset_inputs().items() if k not in ("folder", "caption_extension")}
    return {
        "images": ("IMAGE", {"tooltip": "The training images: an IMAGE batch, or a list of IMAGEs of any sizes "
                             "(each one is bucketed like a file in a folder)."}),
        "captions": ("STRING", {"multiline": True, "default": "", "tooltip": "One caption per image, one per line "
                                "in image order (or a STRING list). A single line is used for every image; empty "
                                "= the class token, as for a folder image without a caption file."}),
        "repeats": ("INT", {"default": 10, "min": 1, "max": 10000, "tooltip": "kohya repeats: each image is used "
                            "this many times per epoch (the <repeats>_ of a folder name)."}),
        "class_token": ("STRING", {"default": "images", "tooltip": "The subset name after <repeats>_ (kohya's "
                                   "class token): the caption of images without one, and the tag-frequency group."}),
        **ds,
        **_caption_inputs(),
    }


def _temp_dir():
    """ComfyUI's temp folder (emptied by ComfyUI at start-up: the dataset folders are a cache)."""
    from pathlib import Path

    return Path(comfy_io._folder_paths().get_temp_directory())


@policy.guarded
class ConceptLabLoraDatasetFromImages:
    """A kohya dataset from IMAGEs + captions in the graph."""

    DESCRIPTION = ("Makes a LoRA training dataset from images in the graph (an IMAGE batch or list, e.g. from "
                   "ComfyUI's Load Image Dataset nodes or after editing) and their captions. Buckets, caption "
                   "processing, repeats and validation split are exactly those of the folder dataset node: the "
                   "images are stored once as a kohya folder (PNG, lossless) in ComfyUI's temp folder and scanned. "
                   "An optional MASK (1 = transparent, as Load Image gives) becomes the images' alpha.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("CONCEPTLAB_DATASET", "STRING", "STRING")
    RETURN_NAMES = ("dataset", "summary", "caption_audit")
    OUTPUT_TOOLTIPS = ("The dataset for the Train LoRA node.",
                       "Images, repeats, steps per epoch at batch size 1, buckets, top tags, caption previews and "
                       "kohya warnings.",
                       "Caption audit as text: contradictions between captions and images.")

    @classmethod
    def INPUT_TYPES(cls):
        """ComfyUI V1 input spec (the folder node's options, less the folder) with a tooltip on every input."""
        return {"required": _inputs(),
                "optional": {"mask": ("MASK", {"tooltip": "Optional transparency per image (ComfyUI MASK, 1 = "
                                               "transparent): composited on 'background' like a transparent PNG."})}}

    def load(self, images, captions=None, repeats=(10,), class_token=("images",), mask=None, **kw):
        """Build the dataset. Every argument arrives as a list (``INPUT_IS_LIST``): ``images`` a list of IMAGE
        tensors ``[B, H, W, 3]``, ``captions`` a list of STRINGs, widgets one-element lists.

        Returns ``(DATASET, summary, caption audit)``. Raises ``ValueError`` for no images, caption or mask counts
        that do not match the images, and the folder node's errors (``DatasetError``) for bad options.
        """
        from ..training.lora.captions import CaptionConfig
        from ..training.lora.dataset import KohyaDataset
        from ..training.lora.dataset_options import DatasetOptions
        from ..training.lora.graph_dataset import match_captions, to_uint8_rgb, write_kohya_folder
        from .lora import _caption_audit

        opts = {k: (v[0] if isinstance(v, (list, tuple)) else v) for k, v in kw.items()}
        rows = [img[i] for img in (images or []) for i in range(img.shape[0])]
        if not rows:
            raise ValueError("no images")
        masks = None
        if mask:
            masks = [m[i] if m.dim() == 3 else m for m in mask for i in range(m.shape[0] if m.dim() == 3 else 1)]
            if len(masks) == 1 and len(rows) > 1:
                masks = masks * len(rows)
            if len(masks) != len(rows):
                raise ValueError(f"{len(masks)} masks for {len(rows)} images: give one mask per image, or one for all")
        caps = match_captions(list(captions) if captions else None, len(rows))
        arrays = [to_uint8_rgb(r, masks[i] if masks else None) for i, r in enumerate(rows)]
        ext = ".txt"
        root = write_kohya_folder(_temp_dir() / _SUBFOLDER, arrays, caps,
                                  repeats=int(repeats[0] if isinstance(repeats, (list, tuple)) else repeats),
                                  name=str(class_token[0] if isinstance(class_token, (list, tuple)) else class_token),
                                  caption_extension=ext)
        opts["caption_extension"] = ext
        ds = KohyaDataset.scan(root, DatasetOptions.from_mapping(opts), CaptionConfig.from_mapping(opts))
        return (ds, ds.summary_text(1), _caption_audit(root))


NODE_CLASS_MAPPINGS = {"ConceptLabLoraDatasetFromImages": ConceptLabLoraDatasetFromImages}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptLabLoraDatasetFromImages": "LoRA Dataset (images from the graph)"}
