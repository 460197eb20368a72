"""Build ``example_workflows/*.json`` (UI format 0.4) from the specs below, then their ``api/`` twins.

    python tests/tools/build_examples.py [--server http://127.0.0.1:8188] [--only pixel_art_lora ...]

Each spec places nodes and links by input / output NAME; every widget not given keeps the input's default,
seed control slots are "fixed". Widget order, sockets and slot counts come from the node definitions
(:mod:`workflow_api`), so a changed ``INPUT_TYPES`` is picked up by re-running this script (``test_workflows``
fails until then). Workflows whose node types are not all available are skipped with a message.
``palette_audit.json`` is written by the palette capability's owner and is not touched here.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workflow_api as wa  # noqa: E402

FRONTEND_VERSION = "1.27.10"
SD15 = "v1-5-pruned-emaonly.safetensors"
COL = 440  # px between columns


class Out:
    """An output socket of a node being built: ``(node id, slot, type)``."""

    def __init__(self, node: dict, slot: int, typ: str):
        self.node, self.slot, self.type = node, slot, typ


class Graph:
    """Minimal UI-workflow writer (litegraph 0.4 serialisation as ComfyUI's frontend exports it)."""

    def __init__(self, info: dict, name: str):
        self.info, self.name = info, name
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def _id(self) -> int:
        return len(self.nodes) + 1

    def note(self, text: str, pos, size=(420, 260), markdown: bool = True, title: str | None = None) -> dict:
        node = {"id": self._id(), "type": "MarkdownNote" if markdown else "Note", "pos": list(pos),
                "size": list(size), "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def add(self, type_: str, pos, title: str | None = None, w_px: int = 320, mode: int = 0, **values) -> dict:
        """Add a node; keyword args are widget values or :class:`Out` links (by input name)."""
        info = self.info.get(type_)
        if info is None:
            raise KeyError(type_)
        names = {n for n, _, _ in wa.ordered_inputs(info)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"{self.name}: {type_} has no inputs {sorted(unknown)}")
        node = {"id": self._id(), "type": type_, "pos": list(pos), "size": [w_px, 100], "flags": {},
                "order": 0, "mode": mode, "inputs": [], "outputs": [],
                "title": title or info.get("display_name") or type_,
                "properties": {"Node name for S&R": type_}, "widgets_values": []}
        self.nodes.append(node)
        sockets = wa.socket_inputs(info)
        widgets = wa.widget_layout(info)
        for name, spec in sockets:
            node["inputs"].append({"name": name, "type": spec[0], "link": None})
        for w in widgets:
            v = values.get(w["input"]) if w["kind"] == "value" else None
            if w["kind"] == "value" and isinstance(v, Out):
                node["inputs"].append({"name": w["name"], "type": "COMBO" if wa._is_combo(w["spec"]) else
                                       w["spec"][0], "widget": {"name": w["name"]}, "link": None})
                v = wa._default(w)
            elif w["kind"] == "value":
                v = wa._default(w) if w["input"] not in values else v
            elif w["kind"] == "control":
                v = "fixed"
            else:
                v = wa._default(w)
            node["widgets_values"].append(v)
        for name, v in values.items():
            if isinstance(v, Out):
                slot = next(i for i, s in enumerate(node["inputs"]) if s["name"] == name)
                self._link(v, node, slot)
        for i, (otype, oname) in enumerate(zip(info["output"], info["output_name"])):
            node["outputs"].append({"name": oname, "type": "COMBO" if isinstance(otype, list) else otype,
                                    "links": []})
        # rough size: sockets/outputs rows + widget rows (+ multiline boxes)
        rows = max(len(sockets), len(node["outputs"]))
        multiline = sum(1 for w in widgets if w["kind"] == "value" and wa._opts(w["spec"]).get("multiline"))
        node["size"] = [w_px, 46 + 22 * rows + 24 * (len(widgets) - multiline) + 90 * multiline]
        return node

    def out(self, node: dict, name) -> Out:
        info = self.info[node["type"]]
        names = list(info["output_name"])
        slot = name if isinstance(name, int) else names.index(name)
        otype = info["output"][slot]
        return Out(node, slot, "COMBO" if isinstance(otype, list) else otype)

    def _link(self, src: Out, dst: dict, slot: int):
        lid = len(self.links) + 1
        self.links.append([lid, src.node["id"], src.slot, dst["id"], slot, src.type])
        dst["inputs"][slot]["link"] = lid
        if src.node["outputs"]:
            src.node["outputs"][src.slot]["links"].append(lid)

    def group(self, title: str, bounding, color: str = "#3f789e"):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": color, "font_size": 24, "flags": {}})

    def to_json(self) -> dict:
        # fix outputs created before their links (add() appends outputs after linking inputs of later nodes)
        for lid, oid, oslot, _, _, _ in self.links:
            src = next(n for n in self.nodes if n["id"] == oid)
            if lid not in src["outputs"][oslot]["links"]:
                src["outputs"][oslot]["links"].append(lid)
        wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "conceptlab/" + self.name)), "revision": 0,
              "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": self.groups, "config": {},
              "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "frontendVersion": FRONTEND_VERSION},
              "version": 0.4}
        # litegraph stores each node's place in the execution order
        raw_nodes = [wa._Node(n, None) for n in self.nodes]
        for i, n in enumerate(wa.execution_order(raw_nodes, wa._links_table(wf))):
            n.raw["order"] = i
        return wf


# ----------------------------------------------------------------------------------------------------------
# specs


def merge_back_sweep(g: Graph):
    g.note("## Merge back: sweep, pick, save\n\n"
           "1. **Load** the base model (A) and your fine-tune (B).\n"
           "2. **Merge Sweep** renders the same prompt and seed at each ratio α (weight of B: "
           "(1 − α)·A + α·B) as one grid — pick the column you like.\n"
           "3. Set that α on **Merge Models** and queue: **Save Checkpoint** writes "
           "`output/checkpoints/merged_*.safetensors`.\n\n"
           "Needs: `models/checkpoints/" + SD15 + "` and a fine-tune of it "
           "(`pixel_art_finetune.safetensors` here; any SD1.5 checkpoint works).", (0, -330), (760, 290))
    a = g.add("CheckpointLoaderSimple", (0, 0), title="Base model (A)", ckpt_name=SD15)
    b = g.add("CheckpointLoaderSimple", (0, 180), title="Fine-tune (B)", ckpt_name="pixel_art_finetune.safetensors")
    pos = g.add("CLIPTextEncode", (0, 360), title="Positive prompt", w_px=360,
                text="pixel art sprite of a knight with a sword, 16x16 grid, limited palette, plain background",
                clip=g.out(a, "CLIP"))
    neg = g.add("CLIPTextEncode", (0, 600), title="Negative prompt", w_px=360,
                text="blurry, photo, gradient, noise, text, watermark", clip=g.out(a, "CLIP"))
    sweep = g.add("ConceptLabMergeSweep", (COL, 0), model_a=g.out(a, "MODEL"), model_b=g.out(b, "MODEL"),
                  positive=g.out(pos, "CONDITIONING"), negative=g.out(neg, "CONDITIONING"), vae=g.out(a, "VAE"),
                  ratios="0, 0.25, 0.5, 0.75, 1", seed=42, rows=2, steps=20, cfg=7.0, sampler_name="euler",
                  scheduler="normal", width=512, height=512)
    g.add("SaveImage", (2 * COL, 0), title="Sweep grid", images=g.out(sweep, "grid"),
          filename_prefix="conceptlab/merge_sweep")
    merge = g.add("ConceptLabMergeModels", (COL, 520), title="Merge Models (chosen α)", model_a=g.out(a, "MODEL"),
                  model_b=g.out(b, "MODEL"), clip_a=g.out(a, "CLIP"), clip_b=g.out(b, "CLIP"),
                  method="weighted_sum", alpha=0.5, seed=0)
    g.add("CheckpointSave", (2 * COL, 520), model=g.out(merge, "model"), clip=g.out(merge, "clip"),
          vae=g.out(a, "VAE"), filename_prefix="checkpoints/merged")
    g.add("PreviewAny", (2 * COL, 760), title="Merge report", source=g.out(merge, "report"))


def weight_diff(g: Graph):
    g.note("## What changed in the weights?\n\n"
           "**Diff Files** compares two files from your model folders, tensor by tensor: two checkpoints, "
           "or a checkpoint and a LoRA (the LoRA's ΔW at `lora_strength`). Each gives a Markdown report, a JSON "
           "report and plots (change per layer type, block × layer heatmap, |Δ| histogram).\n\n"
           "**Compare Weight-Diff Reports** puts two reports side by side (ratios report 2 / report 1).\n\n"
           "Needs: `models/checkpoints/" + SD15 + "`, `models/checkpoints/merged.safetensors` (from the "
           "merge_back_sweep workflow) and `models/loras/pixel_art.safetensors` (from pixel_art_lora).",
           (0, -330), (760, 290))
    d1 = g.add("ConceptLabDiffFiles", (0, 0), title="Checkpoint vs LoRA", w_px=360,
               file_a="checkpoints/" + SD15, file_b="loras/pixel_art.safetensors", lora_strength=1.0)
    d2 = g.add("ConceptLabDiffFiles", (0, 330), title="Checkpoint vs merged checkpoint", w_px=360,
               file_a="checkpoints/" + SD15, file_b="checkpoints/merged.safetensors")
    g.add("PreviewAny", (COL, 0), title="Report: checkpoint vs LoRA", source=g.out(d1, "report"))
    g.add("SaveImage", (COL, 200), title="Plots: checkpoint vs LoRA", images=g.out(d1, "plots"),
          filename_prefix="conceptlab/diff_lora")
    g.add("PreviewAny", (COL, 500), title="Report: checkpoint vs merged", source=g.out(d2, "report"))
    g.add("SaveImage", (COL, 700), title="Plots: checkpoint vs merged", images=g.out(d2, "plots"),
          filename_prefix="conceptlab/diff_merged")
    cmp = g.add("ConceptLabCompareDiffReports", (2 * COL, 0), report_1=g.out(d1, "report_json"),
                report_2=g.out(d2, "report_json"), label_1="LoRA", label_2="merged")
    g.add("PreviewAny", (3 * COL, 0), title="Comparison", source=g.out(cmp, "comparison"))
    g.add("SaveImage", (3 * COL, 200), title="Comparison plot", images=g.out(cmp, "plot"),
          filename_prefix="conceptlab/diff_compare")


PIXEL_PROMPTS = ("pixel art, dawnlike, knight, black outline (#140c1c), red body (#d34549), background (#6dc2ca), "
                 "retro pixel art style\n"
                 "pixel art, dawnlike, green potion, black outline (#140c1c), green body (#6daa2c), background "
                 "(#deeed6), retro pixel art style")
PIXEL_NEG = "blurry, photo, gradient, jpeg artifacts, text, watermark"


def pixel_art_lora(g: Graph):
    g.note("## Pixel-art LoRA (the main job)\n\n"
           "1. Copy the sample dataset into ComfyUI's input folder: `cp -r sample_data/pixel_art ComfyUI/input/` "
           "(kohya layout: `pixel_art/10_dawnlike/*.png` + `.txt` captions).\n"
           "2. **Caption Audit** checks every hex colour in the captions against its image.\n"
           "3. **Train LoRA** trains on `" + SD15 + "`, saves `output/loras/pixel_art-00000N.safetensors` every "
           "epoch, renders the sample prompts and measures palette metrics per epoch, picks the best epoch and "
           "returns the model with it applied.\n"
           "4. The sampler below draws with that model.\n"
           "5. Later, unmute the **Reuse the best epoch** group (select it, Ctrl+M) to draw with **Load LoRA**.\n\n"
           "Needs `models/checkpoints/" + SD15 + "`; a GPU with 8 GB+ (CPU works but takes hours).",
           (0, -400), (900, 360))
    ck = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15)
    audit = g.add("ConceptLabCaptionAudit", (0, 200), folder="pixel_art")
    g.add("PreviewAny", (0, 420), title="Caption audit report", source=g.out(audit, "report"))
    g.add("PreviewImage", (0, 640), title="Caption audit table", images=g.out(audit, "table"))
    ds = g.add("ConceptLabLoraDataset", (COL, 0), w_px=360, folder="pixel_art", resolution=512,
               resize_interpolation="nearest")
    g.add("PreviewAny", (COL, 560), title="Dataset summary", source=g.out(ds, "summary"))
    tr = g.add("ConceptLabTrainLora", (2 * COL, 0), w_px=380, model=g.out(ck, "MODEL"), clip=g.out(ck, "CLIP"),
               vae=g.out(ck, "VAE"), dataset=g.out(ds, "dataset"), output_name="pixel_art", max_train_epochs=10,
               train_batch_size=1, learning_rate=1e-4, network_dim=16, network_alpha=8.0, seed=42,
               sample_prompts=PIXEL_PROMPTS, sample_steps=20, sample_cfg=7.0, best_metric="auto", apply="best")
    x3 = 3 * COL + 40
    g.add("PreviewAny", (x3, 0), title="Applied LoRA file", source=g.out(tr, "lora_name"))
    g.add("SaveImage", (x3, 200), title="Epoch table", images=g.out(tr, "epoch_table"),
          filename_prefix="conceptlab/pixel_art_epochs")
    g.add("SaveImage", (x3, 520), title="Loss curve", images=g.out(tr, "loss_curve"),
          filename_prefix="conceptlab/pixel_art_loss")
    g.add("SaveImage", (x3, 840), title="Samples per epoch", images=g.out(tr, "samples"),
          filename_prefix="conceptlab/pixel_art_samples")
    # draw / reuse groups to the right of the training groups (a wide graph fits a 16:10 thumbnail)
    X0, y = 4 * COL + 140, 0
    pos = g.add("CLIPTextEncode", (X0, y), title="Prompt", w_px=360, clip=g.out(tr, "clip"),
                text=PIXEL_PROMPTS.split("\n")[0])
    neg = g.add("CLIPTextEncode", (X0, y + 240), title="Negative prompt", w_px=360, clip=g.out(tr, "clip"),
                text=PIXEL_NEG)
    lat = g.add("EmptyLatentImage", (X0, y + 480), width=512, height=512, batch_size=4)
    ks = g.add("KSampler", (X0 + COL, y), model=g.out(tr, "model"), positive=g.out(pos, "CONDITIONING"),
               negative=g.out(neg, "CONDITIONING"), latent_image=g.out(lat, "LATENT"), seed=42, steps=25, cfg=7.0,
               sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    dec = g.add("VAEDecode", (X0 + 2 * COL, y), samples=g.out(ks, "LATENT"), vae=g.out(ck, "VAE"))
    g.add("SaveImage", (X0 + x3, y + 200), title="Pixel-art samples", images=g.out(dec, "IMAGE"),
          filename_prefix="conceptlab/pixel_art")
    # reuse later: LoraLoader on the best-epoch file (muted: the file exists only after training)
    y2 = y + 820
    lo = g.add("LoraLoader", (X0, y2), mode=2, title="Load LoRA (best epoch)", model=g.out(ck, "MODEL"),
               clip=g.out(ck, "CLIP"), lora_name="pixel_art-best.safetensors", strength_model=1.0,
               strength_clip=1.0)
    pos2 = g.add("CLIPTextEncode", (X0 + COL, y2), mode=2, title="Prompt (reuse)", w_px=360, clip=g.out(lo, "CLIP"),
                 text=PIXEL_PROMPTS.split("\n")[1])
    neg2 = g.add("CLIPTextEncode", (X0 + COL, y2 + 240), mode=2, title="Negative (reuse)", w_px=360,
                 clip=g.out(lo, "CLIP"), text=PIXEL_NEG)
    ks2 = g.add("KSampler", (X0 + 2 * COL, y2), mode=2, title="KSampler (reuse)", model=g.out(lo, "MODEL"),
                positive=g.out(pos2, "CONDITIONING"), negative=g.out(neg2, "CONDITIONING"),
                latent_image=g.out(lat, "LATENT"), seed=7, steps=25, cfg=7.0, sampler_name="dpmpp_2m",
                scheduler="karras", denoise=1.0)
    dec2 = g.add("VAEDecode", (X0 + x3, y2), mode=2, title="VAE Decode (reuse)", samples=g.out(ks2, "LATENT"),
                 vae=g.out(ck, "VAE"))
    g.add("SaveImage", (X0 + x3, y2 + 120), mode=2, title="Samples with Load LoRA", images=g.out(dec2, "IMAGE"),
          filename_prefix="conceptlab/pixel_art_lora_loader")
    g.group("1. Data and caption audit", (-20, -40, 2 * COL - 20, 980))
    g.group("2. Train with per-epoch samples and palette metrics", (2 * COL - 20, -40, 2 * COL + 80, 1000), "#8A8")
    g.group("3. Draw with the best epoch", (X0 - 20, y - 40, 4 * COL + 80, 760), "#b58b2a")
    g.group("4. Reuse the best epoch later (unmute: Ctrl+M)", (X0 - 20, y2 - 40, 4 * COL + 80, 560), "#444")


SDXL = "sd_xl_base_1.0.safetensors"
SDXL_TOML = ('# NoobAI-XL v-pred files carry v_pred/ztsnr keys that ComfyUI reads; for a v-pred file\n'
             '# without them, uncomment both:\n'
             '# v_parameterization = true\n# zero_terminal_snr = true\n'
             'sample_every_n_epochs = 1\nsample_steps = 20\nsample_cfg = 6.0\n')


def sdxl_pixel_art_lora(g: Graph):
    g.note("## SDXL pixel-art LoRA (Illustrious, NoobAI, Pony, SDXL 1.0)\n\n"
           "The same job as `pixel_art_lora` on an SDXL-family checkpoint: kohya `sdxl_train_network` semantics "
           "(keys `lora_unet_input_blocks_…`, `lora_te1_…`, `lora_te2_…`, `ss_base_model_version = "
           "sdxl_base_v1-0`), each image's original size and crop as SDXL size conditioning, per-epoch samples at "
           "1024 px with palette metrics, and the best epoch applied.\n\n"
           "1. `cp -r sample_data/pixel_art ComfyUI/input/`.\n"
           "2. Put an SDXL-family checkpoint in `models/checkpoints/` and pick it in **Load Checkpoint**.\n"
           "3. v-prediction models (NoobAI-XL v-pred) are recognised from the file; see the TOML box for files "
           "that do not say so.\n\n"
           "Needs a GPU with 12 GB+ (bf16, gradient checkpointing, batch 1).", (0, -400), (900, 380))
    ck = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SDXL)
    ds = g.add("ConceptLabLoraDataset", (0, 200), w_px=360, folder="pixel_art", resolution=1024,
               resize_interpolation="nearest")
    g.add("PreviewAny", (0, 760), title="Dataset summary", source=g.out(ds, "summary"))
    tr = g.add("ConceptLabTrainLora", (COL, 0), w_px=380, model=g.out(ck, "MODEL"), clip=g.out(ck, "CLIP"),
               vae=g.out(ck, "VAE"), dataset=g.out(ds, "dataset"), output_name="pixel_art_xl", max_train_epochs=8,
               train_batch_size=1, learning_rate=1e-4, network_dim=16, network_alpha=8.0, mixed_precision="bf16",
               seed=42, sample_prompts=PIXEL_PROMPTS, best_metric="auto", apply="best", kohya_toml=SDXL_TOML,
               gradient_checkpointing=True)
    x2 = 2 * COL + 40
    g.add("PreviewAny", (x2, 0), title="Applied LoRA file", source=g.out(tr, "lora_name"))
    g.add("SaveImage", (x2, 200), title="Epoch table", images=g.out(tr, "epoch_table"),
          filename_prefix="conceptlab/pixel_art_xl_epochs")
    g.add("SaveImage", (x2, 520), title="Samples per epoch", images=g.out(tr, "samples"),
          filename_prefix="conceptlab/pixel_art_xl_samples")
    X0 = 3 * COL + 120
    pos = g.add("CLIPTextEncode", (X0, 0), title="Prompt", w_px=360, clip=g.out(tr, "clip"),
                text=PIXEL_PROMPTS.split("\n")[0])
    neg = g.add("CLIPTextEncode", (X0, 240), title="Negative prompt", w_px=360, clip=g.out(tr, "clip"),
                text=PIXEL_NEG)
    lat = g.add("EmptyLatentImage", (X0, 480), width=1024, height=1024, batch_size=2)
    ks = g.add("KSampler", (X0 + COL, 0), model=g.out(tr, "model"), positive=g.out(pos, "CONDITIONING"),
               negative=g.out(neg, "CONDITIONING"), latent_image=g.out(lat, "LATENT"), seed=42, steps=25, cfg=6.0,
               sampler_name="euler_ancestral", scheduler="normal", denoise=1.0)
    dec = g.add("VAEDecode", (X0 + 2 * COL, 0), samples=g.out(ks, "LATENT"), vae=g.out(ck, "VAE"))
    g.add("SaveImage", (X0 + 2 * COL, 200), title="Pixel-art samples (SDXL)", images=g.out(dec, "IMAGE"),
          filename_prefix="conceptlab/pixel_art_xl")
    g.group("1. Data", (-20, -40, COL - 20, 1000))
    g.group("2. Train on SDXL with per-epoch samples and palette metrics", (COL - 20, -40, 2 * COL + 80, 900),
            "#8A8")
    g.group("3. Draw with the best epoch", (X0 - 20, -40, 3 * COL + 80, 760), "#b58b2a")


FLUX = "flux1-dev.safetensors"
FLUX_CLIP_L, FLUX_T5, FLUX_VAE = "clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "ae.safetensors"
FLUX_TOML = ('# kohya flux_train_network.py settings (kohya\'s recommended Flux LoRA values)\n'
             'timestep_sampling = "shift"\ndiscrete_flow_shift = 3.1582\nmodel_prediction_type = "raw"\n'
             'guidance_scale = 1.0\n')


def flux_pixel_art_lora(g: Graph):
    g.note("## Flux.1 pixel-art LoRA\n\n"
           "The pixel-art job on Flux.1-dev: kohya `flux_train_network` semantics (keys `lora_unet_double_blocks_…`, "
           "`lora_unet_single_blocks_…`, `ss_base_model_version = flux1`), rectified-flow objective through "
           "ComfyUI's own Flux model and its `model_sampling`, per-epoch samples with Flux sampling (distilled "
           "guidance 3.5 via FluxGuidance, `sample_cfg` = true CFG 1), palette metrics and the best epoch applied.\n\n"
           "1. `cp -r sample_data/pixel_art ComfyUI/input/`.\n"
           "2. `models/diffusion_models/" + FLUX + "`, `models/text_encoders/" + FLUX_CLIP_L + "` and `"
           + FLUX_T5 + "`, `models/vae/" + FLUX_VAE + "`.\n"
           "3. The base loads as fp8 (`weight_dtype fp8_e4m3fn`): LoRA deltas are applied to the up-cast weights, "
           "the fp8 file is never changed.\n\n"
           "Needs a GPU with ~16 GB+ (fp8 base, bf16, gradient checkpointing, batch 1, 512 px).",
           (0, -400), (900, 400))
    un = g.add("UNETLoader", (0, 0), unet_name=FLUX, weight_dtype="fp8_e4m3fn")
    cl = g.add("DualCLIPLoader", (0, 160), clip_name1=FLUX_CLIP_L, clip_name2=FLUX_T5, type="flux")
    va = g.add("VAELoader", (0, 360), vae_name=FLUX_VAE)
    ds = g.add("ConceptLabLoraDataset", (0, 480), w_px=360, folder="pixel_art", resolution=512,
               resize_interpolation="nearest")
    g.add("PreviewAny", (0, 1040), title="Dataset summary", source=g.out(ds, "summary"))
    tr = g.add("ConceptLabTrainLora", (COL, 0), w_px=380, model=g.out(un, "MODEL"), clip=g.out(cl, "CLIP"),
               vae=g.out(va, "VAE"), dataset=g.out(ds, "dataset"), output_name="pixel_art_flux", max_train_epochs=8,
               train_batch_size=1, learning_rate=1e-4, network_dim=16, network_alpha=16.0, mixed_precision="bf16",
               seed=42, sample_prompts=PIXEL_PROMPTS, sample_steps=20, sample_cfg=1.0, best_metric="auto",
               apply="best", kohya_toml=FLUX_TOML, gradient_checkpointing=True)
    x2 = 2 * COL + 40
    g.add("PreviewAny", (x2, 0), title="Applied LoRA file", source=g.out(tr, "lora_name"))
    g.add("SaveImage", (x2, 200), title="Epoch table", images=g.out(tr, "epoch_table"),
          filename_prefix="conceptlab/pixel_art_flux_epochs")
    g.add("SaveImage", (x2, 520), title="Samples per epoch", images=g.out(tr, "samples"),
          filename_prefix="conceptlab/pixel_art_flux_samples")
    X0 = 3 * COL + 120
    pos = g.add("CLIPTextEncode", (X0, 0), title="Prompt", w_px=360, clip=g.out(tr, "clip"),
                text=PIXEL_PROMPTS.split("\n")[0])
    fg = g.add("FluxGuidance", (X0, 240), conditioning=g.out(pos, "CONDITIONING"), guidance=3.5)
    neg = g.add("CLIPTextEncode", (X0, 380), title="Negative (unused at CFG 1)", w_px=360, clip=g.out(tr, "clip"),
                text="")
    lat = g.add("EmptySD3LatentImage", (X0, 600), width=512, height=512, batch_size=2)
    ks = g.add("KSampler", (X0 + COL, 0), model=g.out(tr, "model"), positive=g.out(fg, "CONDITIONING"),
               negative=g.out(neg, "CONDITIONING"), latent_image=g.out(lat, "LATENT"), seed=42, steps=20, cfg=1.0,
               sampler_name="euler", scheduler="simple", denoise=1.0)
    dec = g.add("VAEDecode", (X0 + 2 * COL, 0), samples=g.out(ks, "LATENT"), vae=g.out(va, "VAE"))
    g.add("SaveImage", (X0 + 2 * COL, 200), title="Pixel-art samples (Flux)", images=g.out(dec, "IMAGE"),
          filename_prefix="conceptlab/pixel_art_flux")
    g.group("1. Models and data", (-20, -40, COL - 20, 1300))
    g.group("2. Train on Flux with per-epoch samples and palette metrics", (COL - 20, -40, 2 * COL + 80, 900),
            "#8A8")
    g.group("3. Draw with the best epoch (FluxGuidance 3.5, CFG 1)", (X0 - 20, -40, 3 * COL + 80, 860), "#b58b2a")


def esd_grid_erasure(g: Graph):
    g.note("## Erase a concept with ESD-X and grid masks\n\n"
           "**Grid Masks** makes an n×n grid of cell masks plus a centre mask; **ESD Erase Concept** fine-tunes "
           "the cross-attention (ESD-X) so the concept's prompts (and their variations) no longer steer the "
           "model, weighting the loss by the masks (mask_mode `sum`: every mask each iteration; `grid-sum` builds "
           "the same grid without the Grid Masks node). `concept_kind` phrases the prompt variations for an "
           "artist, object, person, attribute or explicit content; `erase_from` erases an attribute from a "
           "scene. It saves `output/loras/esd/van_gogh_*.safetensors` (any "
           "LoRA loader applies it). **Erasure Comparison Grid** draws concept and unrelated prompts with the "
           "original and the erased model; **Diff Models** shows which weights changed.\n\n"
           "Needs `models/checkpoints/" + SD15 + "`; a GPU (1000 iterations ≈ 20–40 min on a 24 GB card).",
           (0, -420), (820, 380))
    ck = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15)
    gm = g.add("ConceptLabGridMasks", (0, 200), width=512, height=512, grid_n=3, centre_size=0.5)
    g.add("PreviewImage", (0, 460), title="Mask preview", images=g.out(gm, "preview"))
    esd = g.add("ConceptLabESDErase", (COL, 0), w_px=380, model=g.out(ck, "MODEL"), clip=g.out(ck, "CLIP"),
                concepts="Van Gogh", prompt_variations="", variations=100, method="esd-x", iterations=1000,
                negative_guidance=1.0, lr=1e-5, seed=0, resolution=512, save_name="esd/van_gogh",
                mask_mode="sum", concept_kind="style", masks=g.out(gm, "masks"), mask_weights=g.out(gm, "weights"))
    x2 = 2 * COL + 40
    g.add("SaveImage", (x2, 0), title="ESD loss", images=g.out(esd, "loss_plot"), filename_prefix="conceptlab/esd_loss")
    g.add("PreviewAny", (x2, 320), title="ESD stats", source=g.out(esd, "stats"))
    cmp = g.add("ConceptLabErasureCompare", (x2, 520), w_px=380, original=g.out(ck, "MODEL"),
                erased=g.out(esd, "model"), clip=g.out(ck, "CLIP"), vae=g.out(ck, "VAE"), seed=0, steps=20, cfg=7.0,
                width=512, height=512)
    x3 = 3 * COL + 80
    g.add("SaveImage", (x3, 520), title="Original vs erased", images=g.out(cmp, "grid"),
          filename_prefix="conceptlab/esd_compare")
    diff = g.add("ConceptLabDiffModels", (x2, 1140), w_px=380, model_a=g.out(ck, "MODEL"), model_b=g.out(esd, "model"))
    g.add("PreviewAny", (x3, 1140), title="Weight-diff report", source=g.out(diff, "report"))
    g.add("SaveImage", (x3, 1340), title="Weight-diff plots", images=g.out(diff, "plots"),
          filename_prefix="conceptlab/esd_diff")


SPECS = {"pixel_art_lora": pixel_art_lora, "esd_grid_erasure": esd_grid_erasure, "merge_back_sweep": merge_back_sweep,
         "weight_diff": weight_diff, "sdxl_pixel_art_lora": sdxl_pixel_art_lora,
         "flux_pixel_art_lora": flux_pixel_art_lora}


def build(name: str, info: dict) -> dict:
    g = Graph(info, name)
    SPECS[name](g)
    wf = g.to_json()
    problems = wa.validate_workflow(wf, info, set(wa.load_core_pinned()["all_types"]))
    if problems:
        raise ValueError(f"{name}: " + "; ".join(problems))
    return wf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server")
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args(argv)
    info = wa.fetch_object_info(a.server) if a.server else None
    if info is None:
        info = dict(wa.load_core_pinned()["nodes"])
        info.update(wa.pack_object_info())
    built = []
    for name in a.only or SPECS:
        try:
            wf = build(name, info)
        except KeyError as e:
            print(f"skip {name}: node type {e} not available yet")
            continue
        path = wa.EXAMPLES / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wa.dumps(wf), encoding="utf-8")
        built.append(path)
        print("wrote", path.relative_to(wa.REPO))
    if built:
        wa.sync(True, info, built)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
