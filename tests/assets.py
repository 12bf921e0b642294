"""Generated test assets: tiny CLIP models, images of known kinds, parquet datasets, videos.

Nothing here is downloaded. Used by tests/conftest.py and by the benchmarks.
"""

from __future__ import annotations

import datetime
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def save_tiny_clip(
    path: Path,
    projection_dim: int = 16,
    image_size: int = 224,
    patch_size: int = 32,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """A CLIPModel with random weights, 2 layers per tower, saved with save_pretrained plus a
    preprocessor_config.json (CLIP defaults) and tokenizer files generated here."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=256,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=projection_dim,
    )
    model = CLIPModel(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_preprocessor_config(path, image_size)
    if with_tokenizer:
        save_tiny_tokenizer(path)
    return path


def save_tiny_siglip(path: Path, image_size: int = 64, patch_size: int = 16, seed: int = 0,
                     with_tokenizer: bool = True) -> Path:
    """A transformers SiglipModel with random weights, 2 layers per tower, saved with
    save_pretrained, with the preprocessor_config.json SiglipImageProcessor writes (squash to a
    square, mean/std 0.5, no crop) and a character-level fast tokenizer padded to 64 tokens."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    cfg = SiglipConfig(
        text_config=dict(**tower, vocab_size=128, max_position_embeddings=64, pad_token_id=1, eos_token_id=1,
                         bos_token_id=0),
        vision_config=dict(**tower, image_size=image_size, patch_size=patch_size),
    )
    model = SiglipModel(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    if with_tokenizer:
        save_tiny_char_tokenizer(path, context=64)
    return path


TINY_OPEN_CLIP = "fashion-test-tiny"  # an open_clip architecture registered by save_tiny_open_clip


def save_tiny_open_clip(
    folder: Path, resize_mode: str = "squash", seed: int = 0, hf_tokenizer: bool = False, resnet: bool = False,
    convnext: bool = False,
) -> tuple[Path, Path]:
    """A tiny open_clip model with random weights: its config registered with open_clip under
    TINY_OPEN_CLIP (a ViT of 2 layers per tower, 64x64 pictures, CLIP's BPE tokenizer, which
    open_clip carries), saved two ways: a weights file (for open_clip:ARCH:FILE) and a folder with
    open_clip_config.json and open_clip_pytorch_model.bin, as the hub's open_clip repositories hold
    them. resize_mode "squash" with mean/std 0.5 prepares pictures as Marqo-FashionSigLIP does.
    resnet: a convolutional image tower instead (open_clip's ModifiedResNet, one block per stage).
    convnext: a ConvNeXt image tower (timm's test_convnext2: one block per stage, Linear MLPs), its layer
    scales drawn at random, of both signs (trained ones differ by channel; timm starts them all at
    1e-6, where a block adds next to nothing).
    hf_tokenizer: texts tokenized as Marqo-FashionSigLIP's are, by a Hugging Face tokenizer (a
    character tokenizer saved in the folder, with open_clip's "canonicalize" cleaning) into a SigLIP-like
    text tower (no causal mask, the last token pooled). Returns (weights file, folder)."""
    import open_clip
    import torch

    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    preprocess = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "resize_mode": resize_mode}
    if resnet:
        cfg["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}
    if convnext:
        cfg["vision_cfg"] = {"image_size": 64, "timm_model_name": "test_convnext2", "timm_model_pretrained": False,
                             "timm_pool": "", "timm_proj": "linear"}
    if hf_tokenizer:
        cfg["text_cfg"].update(vocab_size=45, hf_tokenizer_name="timm/ViT-B-16-SigLIP", pool_type="last",
                               no_causal_mask=True, tokenizer_kwargs={"clean": "canonicalize"})
    if resize_mode == "shortest":
        preprocess.update(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])
    tower = "-resnet" if resnet else "-convnext" if convnext else ""
    name = TINY_OPEN_CLIP + ("-hf-tokenizer" if hf_tokenizer else "") + tower  # one per config
    configs = folder / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    write_json(configs / f"{name}.json", cfg)
    open_clip.add_model_config(configs / f"{name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        for key, param in model.visual.named_parameters():
            if key.endswith(".gamma"):  # a ConvNeXt block's layer scale
                param.copy_(torch.randn_like(param) * 0.5)
    weights = folder / "tiny_open_clip.bin"
    torch.save(model.state_dict(), weights)
    hub = folder / "repo"
    hub.mkdir(exist_ok=True)
    if hf_tokenizer:  # open_clip reads a local-dir model's Hugging Face tokenizer from the folder itself
        save_tiny_char_tokenizer(hub, context=32)
    torch.save(model.state_dict(), hub / "open_clip_pytorch_model.bin")
    write_json(hub / "open_clip_config.json", {"model_cfg": cfg, "preprocess_cfg": preprocess})
    return weights, hub


def save_tiny_char_tokenizer(path: Path, context: int) -> None:
    """A tokenizers WordLevel tokenizer over single characters (SigLIP-like: `</s>` ends and pads),
    saved as tokenizer.json with a PreTrainedTokenizerFast config, so AutoTokenizer and the
    torch-free `tokenizers` both read it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789-,.!' ")
    vocab = {t: i for i, t in enumerate(["<unk>", "</s>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="</s>", eos_token="</s>",
                                   model_max_length=context)
    fast.save_pretrained(path)


def write_preprocessor_config(path: Path, image_size: int = 224) -> None:
    """The preprocessor_config.json a CLIP checkpoint ships (CLIPImageProcessor, OpenAI values)."""
    write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": image_size},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
    )


def save_tiny_tokenizer(path: Path) -> Path:
    """CLIP BPE tokenizer files made here: a vocabulary of single characters (with and without the
    end-of-word mark) plus a few whole words, so any lower-case ASCII text tokenizes offline.
    Saved as the slow files and as tokenizer.json (fast)."""
    from transformers import AutoTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789-,.!'")
    words = ["red", "blue", "dress", "shirt", "floral"]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = []
    for w in words:  # merges that build each word left to right
        acc = w[0]
        for c in w[1:-1]:
            merges.append(f"{acc} {c}")
            acc += c
            tokens.append(acc)
        merges.append(f"{acc} {w[-1]}</w>")
        tokens.append(w + "</w>")
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "pad_token": "<|endoftext|>",
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        },
    )
    AutoTokenizer.from_pretrained(path).save_pretrained(path)  # writes tokenizer.json
    return path


def save_real_arch_clip(path: Path, seed: int = 0) -> Path:
    """FashionCLIP's architecture (ViT-B/32 at 224, projection 512) with random weights."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(projection_dim=512)).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_preprocessor_config(path)
    return path


def person_yolo(
    yaml: str = "yolov8n-seg.yaml",
    seed: int = 0,
    calibration: Sequence[np.ndarray] | None = None,
    max_det: int = 4,
    score_gain: float = 1.0,
    score_bias: float = 6.0,
):
    """An Ultralytics segmentation (or, from a detection yaml, detection) YOLO built from its yaml
    with seeded random weights, made to "see" persons: every BatchNorm recalibrated on a few
    pictures (random convolutions otherwise shrink activations to ~1e-9 by the last feature map,
    so nothing would depend on the picture), the head calling everything class 0 with a high
    score, and masks = where prototype 0 exceeds prototype 1 (random coefficients mix 32
    prototypes into masks that are often empty, and Ultralytics drops a detection with an empty
    mask). Boxes, masks and their number then depend on
    the picture, which is what comparing two runtimes of one model needs.

    Args:
        calibration: RGB uint8 pictures (H, W, 3), all one size, sides multiples of 32;
            default four generated 480x640 ones.
        score_gain, score_bias: the person logit becomes score_gain * (its random part) +
            score_bias; a smaller gain keeps scores off 1.0, where ties make NMS's choice arbitrary.
    """
    import torch

    from pipeline.yolo import load_yolo

    torch.manual_seed(seed)
    model = load_yolo(yaml, task="segment" if "-seg" in yaml else "detect")
    net = model.model
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration passes
    if calibration is None:
        calibration = [
            np.asarray(rgb_image(480, 640, seed=100 + i).resize((60, 80)).resize((480, 640), Image.BICUBIC))
            for i in range(4)
        ]
    batch = torch.from_numpy(np.stack(calibration)).permute(0, 3, 1, 2).float() / 255
    net.train()
    with torch.no_grad():
        for _ in range(2):  # the second pass sees inputs normalized by the first pass's statistics
            net(batch)
    net.eval()
    head = net.model[-1]
    with torch.no_grad():
        for branch in head.cv3:
            branch[-1].weight[0].mul_(score_gain)
            branch[-1].bias[0] = score_bias
        for branch in getattr(head, "cv4", []) if hasattr(head, "proto") else []:
            branch[-1].weight.mul_(0.01)
            branch[-1].bias.zero_()
            branch[-1].bias[0], branch[-1].bias[1] = 1.0, -1.0
    model.overrides["max_det"] = max_det
    return model


def rgb_image(w: int, h: int, seed: int = 0, color: tuple[int, int, int] | None = None) -> Image.Image:
    """A smooth random picture (or a flat colour) of size w x h."""
    if color is not None:
        return Image.new("RGB", (w, h), color)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(w: int, h: int, seed: int = 0, quality: int = 90) -> bytes:
    return encode(rgb_image(w, h, seed), "JPEG", quality=quality)


def cmyk_jpeg(w: int = 60, h: int = 80, seed: int = 1) -> bytes:
    return encode(rgb_image(w, h, seed).convert("CMYK"), "JPEG", quality=92)


def rgba_png(w: int = 64, h: int = 48, seed: int = 2) -> bytes:
    """Left half opaque picture, right half fully transparent (should become white)."""
    im = rgb_image(w, h, seed).convert("RGBA")
    a = np.asarray(im).copy()
    a[:, w // 2 :, 3] = 0
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def exif_rotated_jpeg(w: int = 80, h: int = 40, orientation: int = 6, seed: int = 3) -> bytes:
    """A w x h JPEG whose EXIF says rotate (6 = 90 degrees clockwise), so it displays h x w."""
    im = rgb_image(w, h, seed)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", quality=92, exif=exif.tobytes())


def grayscale_png(w: int = 50, h: int = 70, seed: int = 4) -> bytes:
    return encode(rgb_image(w, h, seed).convert("L"), "PNG")


def gray16_png(w: int = 40, h: int = 40) -> bytes:
    arr = (np.linspace(0, 65535, w * h).reshape(h, w)).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def webp_bytes(w: int = 70, h: int = 50, seed: int = 5) -> bytes:
    return encode(rgb_image(w, h, seed), "WEBP", quality=90)


def corrupt_bytes() -> bytes:
    return b"this is not an image at all"


def write_parquet_dataset(
    folder: Path, cells: Sequence[bytes | None], extra: dict[str, Sequence] | None = None, column: str = "image"
) -> Path:
    """A local Hugging Face dataset: folder/data/train-00000-of-00001.parquet with an Image column."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    data = {column: [None if c is None else {"bytes": c, "path": None} for c in cells]}
    features = {column: datasets.Image()}
    for name, values in (extra or {}).items():
        data[name] = list(values)
        if values and isinstance(values[0], (bytes, type(None))):
            data[name] = [None if c is None else {"bytes": c, "path": None} for c in values]
            features[name] = datasets.Image()
        else:
            kinds = {bool: "bool", str: "string", float: "float64", datetime.date: "date32"}
            first = next((v for v in values if v is not None), "")
            features[name] = datasets.Value(kinds.get(type(first), "int64"))
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    (folder / "data").mkdir(exist_ok=True)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def write_video(
    path: Path, frames: int, size_wh: tuple[int, int] = (160, 120), fps: float = 30.0, color_fn=None
) -> Path:
    """An MJPG .avi or mp4v .mp4 written with cv2.VideoWriter; color_fn(i) -> BGR uint8 frame."""
    import cv2

    w, h = size_wh
    fourcc = cv2.VideoWriter_fourcc(*("mp4v" if path.suffix == ".mp4" else "MJPG"))
    writer = cv2.VideoWriter(str(path), fourcc, fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write {path}")
    for i in range(frames):
        frame = color_fn(i) if color_fn else np.full((h, w, 3), i % 256, np.uint8)
        writer.write(frame)
    writer.release()
    return path


def mark_mp4_rotated_clockwise(path: Path) -> Path:
    """Give an .mp4 the display matrix of a phone held upright (shown turned 90 degrees clockwise),
    by rewriting the identity matrix in its track header (tkhd)."""
    import struct

    data = bytearray(path.read_bytes())
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.find(identity, data.find(b"tkhd"))
    if at < 0:
        raise ValueError(f"{path}: no identity matrix in a tkhd box")
    data[at : at + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def write_hub_dataset(
    folder: Path, shards: int = 3, rows_per_shard: int = 60, row_group: int = 20, size_wh: tuple[int, int] = (96, 128)
) -> Path:
    """A dataset repository laid out like lirus18/deepfashion: data/train-0000k-of-0000n.parquet shards
    with Image columns image, openpose, cloth and a string caption, row groups of `row_group` rows,
    and a README whose YAML names the config, the features and the split size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {
        "image": {"_type": "Image"},
        "openpose": {"_type": "Image"},
        "cloth": {"_type": "Image"},
        "caption": {"dtype": "string", "_type": "Value"},
    }
    schema = pa.schema(
        [("image", image_type), ("openpose", image_type), ("cloth", image_type), ("caption", pa.string())],
        metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()},
    )
    (folder / "data").mkdir(parents=True, exist_ok=True)
    w, h = size_wh
    for s in range(shards):
        rows = range(s * rows_per_shard, (s + 1) * rows_per_shard)
        table = pa.table(
            {
                "image": [{"bytes": jpeg_bytes(w, h, seed=i), "path": f"{i}.jpg"} for i in rows],
                "openpose": [{"bytes": jpeg_bytes(w, h, seed=10_000 + i), "path": None} for i in rows],
                "cloth": [{"bytes": jpeg_bytes(w, h, seed=20_000 + i), "path": None} for i in rows],
                "caption": [f"a garment, row {i}" for i in rows],
            },
            schema=schema,
        )
        pq.write_table(table, folder / "data" / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=row_group)
    n = shards * rows_per_shard
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "dataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: openpose\n    dtype: image\n"
        "  - name: cloth\n    dtype: image\n  - name: caption\n    dtype: string\n  splits:\n  - name: train\n"
        f"    num_examples: {n}\n    num_bytes: {sum(f.stat().st_size for f in (folder / 'data').iterdir())}\n"
        "---\n# A stand-in of lirus18/deepfashion\n"
    )
    return folder


GARMENT_COLOURS = [((230, 30, 30), (250, 250, 250)), ((150, 0, 150), (0, 200, 200)), ((20, 40, 200), (250, 220, 0))]


def garment(kind: int, w: int = 48, h: int = 96) -> np.ndarray:
    """A garment-like pattern, uint8 (h, w, 3) RGB: 0 red/white stripes, 1 purple/cyan rings,
    2 blue/yellow checks. Kinds 0 and 1 are far apart for the tiny CLIP of the tests (cosine ~0.6)."""
    y, x = np.mgrid[0:h, 0:w]
    if kind == 0:
        on = (y * 96 // h // 10) % 2 == 0
    elif kind == 1:
        on = (np.hypot((x - w / 2) * 60 / w, (y - h / 2) * 120 / h) // 10) % 2 == 0
    else:
        on = ((x * 60 // w // 12) + (y * 120 // h // 12)) % 2 == 0
    a, b = GARMENT_COLOURS[kind]
    return np.where(on[..., None], np.array(a, np.uint8), np.array(b, np.uint8)).astype(np.uint8)


def write_walking_clip(path: Path, scene, frames: int, size_wh: tuple[int, int] = (320, 180), fps: float = 30.0):
    """A clip of garment blocks on a grey floor. scene(i) -> [(garment kind, [x1, y1, x2, y2])] for
    frame i, drawn in that order (the later one in front)."""

    def frame(i):
        f = np.full((size_wh[1], size_wh[0], 3), 128, np.uint8)
        for kind, box in scene(i):
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            f[y1:y2, x1:x2] = garment(kind, x2 - x1, y2 - y1)[..., ::-1]  # BGR for the writer
        return f

    return write_video(path, frames, size_wh, fps, color_fn=frame)
