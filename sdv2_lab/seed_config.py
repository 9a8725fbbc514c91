"""The seed's arguments -> Hydra overrides, for every front end (the Python API and ``run_v2v.sh``).

    overrides = seed_overrides(checkpoint_folder="ckpts/wan_causal_dmd_v2v", mode="single", step=2)
    cfg = compose_config("config", overrides)

With a checkpoint folder, everything else is found as the reference finds it (reference.md §1.10): the Wan2.1
folder ``wan_models/Wan2.1-<model_type>/`` (``config.json``, ``Wan2.1_VAE.pth``, the T5 ``.pth`` and its
``google/umt5-xxl/`` tokenizer) and ``ckpts/taew2_1.pth`` under a project root, which is, in this order:
``$STREAMDIFFUSIONV2_ROOT``, the working directory, and the root the checkpoint folder sits in
(``<root>/ckpts/<name>/model.pt``). ``wan_folder=`` / ``$SDV2_WAN_ROOT`` and ``taehv=`` / ``$SDV2_TAEHV`` name the
pieces directly; the LightX2V plugin VAEs ``lightvaew2_1`` and ``lighttaew2_1`` (``.pth`` or ``.safetensors``)
are found under ``ckpts/`` as ``taew2_1.pth`` is, or named by ``lightvae=`` / ``$SDV2_LIGHTVAE`` and
``lighttae=`` / ``$SDV2_LIGHTTAE``. ``vae=`` picks the VAE (``VAES``). Model sizes come from the files (the
DiT's from ``config.json`` here, the text encoder's from its tensors' shapes; a VAE's from the file it loads,
when it loads it: so any VAE choice, here or in later overrides, reads its own file's size). A missing piece
is a ``FileNotFoundError`` naming the file expected and every place it was looked for.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

MODEL_TYPES = {"T2V-1.3B": "wan_1_3b", "T2V-14B": "wan_14b"}
MODES = {"single": "single", "single-wo": "single_wo"}
GENERATOR_FILE = "model.pt"
CONFIG_FILE = "config.json"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
TAEHV_FILE = "taew2_1.pth"
# the plugin VAEs (lightx2v/Autoencoders), each published as .pth and .safetensors: weights key -> file names
PLUGIN_FILES = {"lightvae": ("lightvaew2_1.pth", "lightvaew2_1.safetensors"),
                "lighttae": ("lighttaew2_1.pth", "lighttaew2_1.safetensors")}
PLUGIN_ENV = {"lightvae": "SDV2_LIGHTVAE", "lighttae": "SDV2_LIGHTTAE"}
# the seed's vae= choices -> (conf/vae config with a checkpoint folder, without one: the tiny CPU demo), and
# the file each needs beyond the Wan folder
VAES = {"wan": ("wan", "wan_tiny", None), "taehv": ("taehv", "taehv_tiny", "taehv"),
        "taehv_full": ("taehv_full", "taehv_full_tiny", "taehv"), "lightvae": ("lightvae", "lightvae_tiny", "lightvae"),
        "lighttae": ("lighttae", "lighttae_tiny", "lighttae"),
        "lighttae_full": ("lighttae_full", "lighttae_full_tiny", "lighttae")}
# the reference's wan_causal_dmd_v2v_fast.yaml (reference.md §4.7)
FAST_CONFIG = ["num_kv_cache=5", "sink_frames=2", "adapt_sink_threshold=-1"]
# reference YAML key -> our key (the inference keys of wan_causal_dmd_v2v*.yaml)
YAML_KEYS = {"num_kv_cache": "num_kv_cache", "num_sink_tokens": "sink_frames",
             "adapt_sink_threshold": "adapt_sink_threshold", "num_frame_per_block": "frames_per_block"}


@dataclass
class CheckpointLayout:
    """The official files behind one checkpoint folder."""
    checkpoint: Path              # the StreamDiffusionV2 generator (model.pt)
    wan_folder: Path              # Wan2.1-<type>/
    config: dict                  # its config.json
    vae: Path                     # Wan2.1_VAE.pth
    t5: Path                      # models_t5_umt5-xxl-enc-bf16.pth
    tokenizer: Path               # google/umt5-xxl/
    taehv: Optional[Path] = None  # taew2_1.pth (only when found or needed)
    lightvae: Optional[Path] = None   # lightvaew2_1.pth / .safetensors (found, or where it is expected)
    lighttae: Optional[Path] = None   # lighttaew2_1.pth / .safetensors (likewise)


# ---------------------------------------------------------------------------------------------- finding files
def project_roots(checkpoint_folder: Path) -> list[tuple[Path, str]]:
    """Where ``wan_models/`` and ``ckpts/`` are looked for, in order, each with why."""
    roots = []
    env = os.environ.get("STREAMDIFFUSIONV2_ROOT")
    if env:
        roots.append((Path(env).expanduser(), "$STREAMDIFFUSIONV2_ROOT"))
    roots.append((Path.cwd(), "the working directory"))
    roots.append((checkpoint_folder.resolve().parent.parent, "the root of the checkpoint folder"))
    seen, out = set(), []
    for path, why in roots:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append((path, why))
    return out


def _first_existing(candidates: list[tuple[Path, str]], what: str, hint: str, is_dir: bool) -> Path:
    for path, _ in candidates:
        if (path.is_dir() if is_dir else path.is_file()):
            return path
    looked = "\n  ".join(f"{p} ({why})" for p, why in candidates)
    raise FileNotFoundError(f"{what} not found; looked for:\n  {looked}\n{hint}")


def find_generator(checkpoint_folder: str | Path) -> Path:
    """``model.pt`` in the folder (or the file itself when a file is given)."""
    path = Path(checkpoint_folder).expanduser()
    if path.is_file():
        return path
    return _first_existing([(path / GENERATOR_FILE, "checkpoint_folder")], f"the StreamDiffusionV2 generator "
                           f"{GENERATOR_FILE}", "checkpoint_folder is the folder holding model.pt (e.g. "
                           "ckpts/wan_causal_dmd_v2v from jerryfeng/StreamDiffusionV2)", is_dir=False)


def find_wan_folder(model_type: str, checkpoint_folder: Path, wan_folder: Optional[str | Path] = None) -> Path:
    name = f"wan_models/Wan2.1-{model_type}"
    if wan_folder:
        candidates = [(Path(wan_folder).expanduser(), "wan_folder")]
    elif os.environ.get("SDV2_WAN_ROOT"):
        candidates = [(Path(os.environ["SDV2_WAN_ROOT"]).expanduser(), "$SDV2_WAN_ROOT")]
    else:
        candidates = [(root / name, why) for root, why in project_roots(checkpoint_folder)]
    return _first_existing(candidates, f"the Wan2.1 folder {name}/ (config.json, {VAE_FILE}, {T5_FILE}, "
                           f"{TOKENIZER_DIR}/)", "Put the Wan2.1 folder there, set $STREAMDIFFUSIONV2_ROOT to the "
                           "folder holding wan_models/ and ckpts/, or name it with wan_folder= (--wan_folder).",
                           is_dir=True)


def find_taehv(checkpoint_folder: Path, taehv: Optional[str | Path] = None) -> Path:
    if taehv:
        candidates = [(Path(taehv).expanduser(), "taehv")]
    elif os.environ.get("SDV2_TAEHV"):
        candidates = [(Path(os.environ["SDV2_TAEHV"]).expanduser(), "$SDV2_TAEHV")]
    else:
        candidates = [(root / "ckpts" / TAEHV_FILE, why) for root, why in project_roots(checkpoint_folder)]
    return _first_existing(candidates, f"the TAEHV decoder ckpts/{TAEHV_FILE} (needed by use_taehv / fast)",
                           "Download it from https://github.com/madebyollin/taehv/raw/main/taew2_1.pth into "
                           "ckpts/, or name it with $SDV2_TAEHV.", is_dir=False)


def plugin_candidates(kind: str, checkpoint_folder: Path, explicit: Optional[str | Path] = None) -> list:
    """Where ``lightvaew2_1`` / ``lighttaew2_1`` (``kind``: a ``PLUGIN_FILES`` key) is looked for, in order."""
    env = PLUGIN_ENV[kind]
    if explicit:
        return [(Path(explicit).expanduser(), kind)]
    if os.environ.get(env):
        return [(Path(os.environ[env]).expanduser(), f"${env}")]
    return [(root / "ckpts" / name, why) for root, why in project_roots(checkpoint_folder)
            for name in PLUGIN_FILES[kind]]


def expected_plugin(kind: str, checkpoint_folder: Path, explicit: Optional[str | Path] = None) -> Path:
    """Where a plugin VAE that was not found should be: the path named, else beside the checkpoint folder
    (``<root>/ckpts/lightvaew2_1.pth``)."""
    candidates = plugin_candidates(kind, checkpoint_folder, explicit)
    if len(candidates) == 1:
        return candidates[0][0]
    return candidates[-len(PLUGIN_FILES[kind])][0]


def find_plugin(kind: str, checkpoint_folder: Path, explicit: Optional[str | Path] = None) -> Path:
    names = " or ".join(PLUGIN_FILES[kind])
    return _first_existing(plugin_candidates(kind, checkpoint_folder, explicit), f"the {kind} weights ckpts/{names}",
                           f"Get {names} from the Hugging Face repo lightx2v/Autoencoders into ckpts/, or name it "
                           f"with ${PLUGIN_ENV[kind]} (weights.{kind}=...).", is_dir=False)


def _require(folder: Path, name: str, what: str, is_dir: bool = False) -> Path:
    return _first_existing([(folder / name, "the Wan2.1 folder")], f"{what} {name}",
                           f"{folder} must hold the official Wan2.1 files (Wan-AI/Wan2.1-T2V-*)", is_dir)


def resolve_checkpoint_folder(checkpoint_folder: str | Path, model_type: str = "T2V-1.3B", *,
                              wan_folder: Optional[str | Path] = None, taehv: Optional[str | Path] = None,
                              need_taehv: bool = False, lightvae: Optional[str | Path] = None,
                              lighttae: Optional[str | Path] = None, need: tuple = ()) -> CheckpointLayout:
    """Every official file behind ``checkpoint_folder``, checked to exist (and not to look truncated). The
    plugin VAEs are optional unless named in ``need`` (``"lightvae"``, ``"lighttae"``); one not found is set to
    where it is expected beside the checkpoint (``<root>/ckpts/``), so that a later ``vae=lightvae`` says it."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    generator = find_generator(checkpoint_folder)
    folder = generator.parent
    wan = find_wan_folder(model_type, folder, wan_folder)
    config_path = _require(wan, CONFIG_FILE, "the DiT config")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    layout = CheckpointLayout(checkpoint=generator, wan_folder=wan, config=config,
                              vae=_require(wan, VAE_FILE, "the Wan VAE"), t5=_require(wan, T5_FILE, "the UMT5 encoder"),
                              tokenizer=_require(wan, TOKENIZER_DIR, "the UMT5 tokenizer folder", is_dir=True))
    try:
        layout.taehv = find_taehv(folder, taehv)
    except FileNotFoundError:
        if need_taehv or "taehv" in need:
            raise
    for kind, explicit in (("lightvae", lightvae), ("lighttae", lighttae)):
        try:
            setattr(layout, kind, find_plugin(kind, folder, explicit))
        except FileNotFoundError:
            if kind in need:
                raise
            setattr(layout, kind, expected_plugin(kind, folder, explicit))
    for path in (layout.checkpoint, layout.vae, layout.t5, layout.taehv, layout.lightvae, layout.lighttae):
        if path is not None and path.is_file():
            check_torch_file(path)
    return layout


def check_torch_file(path: str | Path) -> None:
    """A ``torch.save`` file is a zip archive: one that starts like a zip but has no central directory was cut
    short (an interrupted download or copy). Said here, naming the file, before any model is built."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): download it again")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} looks truncated: it is the start of a torch zip archive ({size:,} bytes) without "
                         f"its end (an interrupted download or copy?); download it again")


# ---------------------------------------------------------------------------------------------- sizes from files
def dit_size(config: dict, source: str = CONFIG_FILE) -> dict:
    """The DiT's size keys from a Wan ``config.json``."""
    keys = {"dim": "dim", "ffn_dim": "ffn_dim", "num_heads": "num_heads", "num_layers": "num_layers"}
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{source}: a Wan2.1 config.json names {sorted(keys)}; missing {missing}")
    return {ours: int(config[theirs]) for ours, theirs in keys.items()}


def _shapes(path: Path) -> dict[str, tuple]:
    """Tensor shapes of a torch state-dict file, read memory-mapped (no tensor data is loaded)."""
    import torch
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def t5_size(path: Path) -> dict:
    """The UMT5 encoder's size keys (``conf/text_encoder``) from Wan's T5 ``.pth``."""
    s = _shapes(path)
    try:
        vocab, dim = s["token_embedding.weight"]
        buckets, heads = s["blocks.0.pos_embedding.embedding.weight"]
        inner = s["blocks.0.attn.q.weight"][0]
        ffn = s["blocks.0.ffn.fc1.weight"][0]
    except KeyError as exc:
        raise ValueError(f"{path}: not a Wan T5 encoder state dict (no {exc.args[0]}; keys e.g. "
                         f"{sorted(s)[:4]})") from None
    layers = len({k.split(".")[1] for k in s if re.match(r"blocks\.\d+\.", k)})
    return dict(vocab=vocab, dim=dim, heads=heads, head_dim=inner // heads, ffn=ffn, layers=layers, buckets=buckets)


def size_overrides(layout: CheckpointLayout) -> list[str]:
    """``backbone.*`` and ``text_encoder.*`` overrides from the files' sizes. No ``vae.*``: every VAE reads its
    architecture from the file it loads (``vae/checkpoints.py``), so that whichever VAE the config ends up
    with (``vae=``, or a later override) gets its own file's size, and no internal key of one VAE's config can
    clash with another's."""
    ov = [f"backbone.{k}={v}" for k, v in dit_size(layout.config, str(layout.wan_folder / CONFIG_FILE)).items()]
    # "++": set or add, so that a later text_encoder choice (text_encoder=hashed) does not fail on a key it lacks
    ov += [f"++text_encoder.{k}={v}" for k, v in t5_size(layout.t5).items()]
    return ov


# ---------------------------------------------------------------------------------------------- the seed's YAML
def yaml_overrides(path: str | Path) -> list[str]:
    """The reference's YAML (e.g. ``wan_causal_dmd_v2v.yaml``): its inference keys as overrides."""
    import yaml
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"config_path {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config_path {p}: not valid YAML ({getattr(exc, 'problem', None) or exc}{where})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config_path {p}: not UTF-8 text (byte at offset {exc.start})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config_path {p}: expected a YAML mapping, got {type(data).__name__}")
    ov = [f"{ours}={data[theirs]}" for theirs, ours in YAML_KEYS.items() if theirs in data]
    if "denoising_step_list" in data:
        steps = [int(t) for t in data["denoising_step_list"] if int(t) != 0]
        ov.append(f"denoising_step_list=[{','.join(map(str, steps))}]")
    return ov


# ---------------------------------------------------------------------------------------------- the one mapping
def backbone_names() -> list[str]:
    """The backbone entries of ``conf/backbone`` (the names ``model=`` / ``--model`` take)."""
    from .configs import CONF_DIR
    return sorted(p.stem for p in (Path(CONF_DIR) / "backbone").glob("*.yaml"))


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_overrides(*, checkpoint_folder: Optional[str | Path] = None, mode: str = "single",
                   model_type: str = "T2V-1.3B", step: Optional[int] = None, height: int = 480, width: int = 832,
                   fps: int = 16, model: Optional[str] = None,
                   seed: int = 0, noise_scale: float = 0.8, device: Optional[str] = None, use_taehv: bool = False,
                   use_tensorrt: bool = False, fast: bool = False, config_path: Optional[str | Path] = None,
                   wan_folder: Optional[str | Path] = None, taehv: Optional[str | Path] = None,
                   vae: Optional[str] = None, lightvae: Optional[str | Path] = None,
                   lighttae: Optional[str | Path] = None) -> list[str]:
    """The Hydra overrides of the seed's constructor / CLI arguments (reference.md §4.2, §4.5).

    Flags are normalised as the seed does: ``fast`` implies ``use_tensorrt``, which implies ``use_taehv``. There
    is no TensorRT here: the accelerated decode path is TAEHV's CUDA-graph replay (on a GPU). ``vae``: one of
    ``VAES`` (default: ``taehv`` with ``use_taehv``, else ``wan``); it wins over ``use_taehv``'s choice, except
    that a VAE without a tiny decoder (wan, lightvae) contradicts ``use_taehv``. Without a checkpoint folder the
    pipeline is the tiny model with dummy weights (for trying things on a CPU) and each VAE its tiny variant.

    ``model``: a backbone entry of ``conf/backbone`` (``self_forcing``, ``longlive``, ...: docs/backbones.md) in
    place of the StreamDiffusionV2 model ``model_type`` names; its recipe comes with it (the Wan folder is still
    ``model_type``'s). ``step`` None: the model's recipe's steps (StreamDiffusionV2's: 2)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)} here, got {mode!r} (pipe: run_v2v.sh pipe)")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    if vae is not None and vae not in VAES:
        raise ValueError(f"vae must be one of {sorted(VAES)}, got {vae!r}")
    if model is not None and model not in backbone_names():
        raise ValueError(f"model must be one of {backbone_names()} (conf/backbone), got {model!r}")
    use_tensorrt = use_tensorrt or fast
    use_taehv = use_taehv or use_tensorrt
    if use_taehv and vae in ("wan", "lightvae"):
        raise ValueError(f"vae={vae!r} decodes with a full VAE, but use_taehv / use_tensorrt / fast ask for the TAEHV "
                         f"decoder: drop one (vae='taehv' or 'lighttae' decode with a tiny decoder)")
    vae = vae or ("taehv" if use_taehv else "wan")
    device = str(device or default_device())
    ov = [f"mode={MODES[mode]}", *([f"steps={step}"] if step is not None else []), f"height={height}",
          f"width={width}", f"fps={fps}", f"seed={seed}", f"noise_scale={noise_scale}", f"device={device}"]
    real, tiny, needs = VAES[vae]
    if checkpoint_folder is not None:
        layout = resolve_checkpoint_folder(checkpoint_folder, model_type, wan_folder=wan_folder, taehv=taehv,
                                           lightvae=lightvae, lighttae=lighttae, need=(needs,) if needs else ())
        ov += [f"backbone={model or MODEL_TYPES[model_type]}", "weights=real",
               f"weights.checkpoint={quote(layout.checkpoint)}", f"weights.wan_folder={quote(layout.wan_folder)}",
               f"weights.taehv={quote(layout.taehv) if layout.taehv else 'null'}",
               f"weights.lightvae={quote(layout.lightvae)}", f"weights.lighttae={quote(layout.lighttae)}",
               "text_encoder=umt5_xxl", f"++text_encoder.checkpoint={quote(layout.t5)}",
               f"++text_encoder.tokenizer={quote(layout.tokenizer)}", f"vae={real}"]
        ov += size_overrides(layout)
    else:
        if model is not None:   # dummy weights at the model's own size
            ov.append(f"backbone={model}")
        if vae != "wan":
            ov.append(f"vae={tiny}")
    if not device.startswith("cuda"):
        ov.append("vae.accelerate=none")  # CUDA graphs need a GPU: eager, said once here instead of per build
    elif use_tensorrt:
        ov.append("vae.accelerate=cuda_graph")
    if fast:
        ov += FAST_CONFIG + [f"cuda_graph={str(device.startswith('cuda')).lower()}"]
    if config_path:  # after the fast keys: a given YAML wins, as in the reference
        ov += yaml_overrides(fast_config_path(config_path) if fast else config_path)
    return ov


def fast_config_path(path: str | Path) -> Path:
    """As the reference's ``resolve_config_path``: ``wan_causal_dmd_v2v.yaml`` becomes the ``_fast.yaml`` beside
    it (when that exists); any other YAML is used as given."""
    path = Path(path)
    fast = path.with_name("wan_causal_dmd_v2v_fast.yaml")
    return fast if path.name == "wan_causal_dmd_v2v.yaml" and fast.is_file() else path


def quote(value) -> str:
    """A value for a Hydra override, quoted so that spaces, commas, '=' or quotes in paths survive."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"
