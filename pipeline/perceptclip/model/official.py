"""The released PerceptCLIP checkpoints: conversion to artifacts, and the built-in model names.

A release file is a plain ``state_dict`` of a module built from Hugging Face ``transformers`` CLIP and
``peft`` LoRA (PAPER.md, "The released checkpoints"):

    model.base_model.model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}
    model.base_model.model.pre_layrnorm.*
    model.base_model.model.encoder.layers.{i}.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2, self_attn.out_proj}.*
    model.base_model.model.encoder.layers.{i}.self_attn.{q,k,v}_proj.base_layer.{weight, bias}
    model.base_model.model.encoder.layers.{i}.self_attn.{q,k,v}_proj.lora_{A,B}.default.weight
    model.base_model.model.post_layernorm.*
    proj.weight (embed_dim, width)          CLIP's visual projection, a bias-free Linear
    mlp.fc1.*, mlp.fc2.*, mlp.fc3.*         the head

Conversion maps these names onto open_clip's VisionTransformer (q, k and v base weights concatenated
into the fused ``in_proj_weight``, each LoRA pair kept apart) and infers the architecture from the
tensor shapes. The file stores no LoRA alpha: the release used alpha 8 (PAPER.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from perceptclip.core.tasks import get_task
from perceptclip.model.artifact import CONFIG_FILE, ArtifactError, ArtifactMeta, cache_dir, publish_once, save_artifact
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.config import BackboneConfig, HeadConfig, LoraConfig, ModelConfig
from perceptclip.model.releases import BUILTIN_MODELS

PREFIX = "model.base_model.model."
OPENAI_HEAD_WIDTH = 64      # OpenAI's ViTs use 64-dimensional attention heads
RELEASE_LORA_ALPHA = 8.0



class CheckpointLayoutError(ValueError):
    """A file that is not a PerceptCLIP release checkpoint."""


def load_release_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` with ``weights_only=True``: tensors and containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code, a zip of something else, random bytes
        raise CheckpointLayoutError(
            f"{path}: cannot be read as a plain PyTorch state_dict with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointLayoutError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return state


def _require(state: dict, keys: list[str], where: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        sample = ", ".join(sorted(state)[:5]) or "(no tensors)"
        raise CheckpointLayoutError(
            f"{where}: not the PerceptCLIP release layout; missing {', '.join(missing[:4])}"
            f"{' and more' if len(missing) > 4 else ''}. Its first keys are: {sample}"
        )


def infer_model_config(state: dict[str, torch.Tensor], task: str, where: str = "checkpoint",
                       lora_alpha: float = RELEASE_LORA_ALPHA, head_width: int = OPENAI_HEAD_WIDTH) -> ModelConfig:
    """The architecture of a release state dict, from its tensor shapes."""
    p = PREFIX
    _require(state, [f"{p}embeddings.class_embedding", f"{p}embeddings.patch_embedding.weight",
                     f"{p}embeddings.position_embedding.weight", f"{p}pre_layrnorm.weight",
                     f"{p}post_layernorm.weight", "proj.weight", "mlp.fc1.weight"], where)
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k))}
    if not layer_ids or sorted(layer_ids) != list(range(len(layer_ids))):
        raise CheckpointLayoutError(f"{where}: encoder layers missing or not numbered 0..N-1")
    _require(state, [f"{p}encoder.layers.0.self_attn.{x}_proj.lora_A.default.weight" for x in "qkv"], where)

    width = state[f"{p}embeddings.class_embedding"].shape[0]
    patch = state[f"{p}embeddings.patch_embedding.weight"].shape[-1]
    positions = state[f"{p}embeddings.position_embedding.weight"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise CheckpointLayoutError(f"{where}: {positions} position embeddings do not form a square grid plus a class token")
    mlp_width = state[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0]
    embed_dim = state["proj.weight"].shape[0]
    rank = state[f"{p}encoder.layers.0.self_attn.q_proj.lora_A.default.weight"].shape[0]
    fcs = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"mlp\.fc(\d+)\.weight", k)))
    head_shapes = [tuple(state[f"mlp.fc{i}.weight"].shape) for i in fcs]   # (out, in) each
    size = head_shapes[-1][0]
    expected = get_task(task).head_size
    if size != expected:
        raise CheckpointLayoutError(f"{where}: head of size {size} but task {task!r} needs {expected}; wrong --task?")
    if width % head_width:
        raise CheckpointLayoutError(f"{where}: width {width} is not a multiple of the {head_width}-wide attention heads")
    standard = (width, len(layer_ids), patch, grid * patch, embed_dim) == (1024, 24, 14, 224, 768)
    return ModelConfig(
        backbone=BackboneConfig(
            name="ViT-L-14-quickgelu" if standard else f"ViT-w{width}-l{len(layer_ids)}-p{patch}-quickgelu",
            pretrained=None,     # the release carries the whole vision tower
            embed_dim=embed_dim,
            quick_gelu=True,
            vision={"image_size": grid * patch, "layers": len(layer_ids), "width": width, "patch_size": patch,
                    "head_width": head_width, "mlp_ratio": mlp_width / width},
        ),
        lora=LoraConfig(r=rank, alpha=lora_alpha, dropout=0.1),
        head=HeadConfig(size=size, hidden=tuple(s[0] for s in head_shapes[:-1]), dropout=0.5),
    )


def convert_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Release names -> ``ClipLoraModel`` names."""
    p = PREFIX
    out = {
        "visual.class_embedding": state[f"{p}embeddings.class_embedding"],
        "visual.conv1.weight": state[f"{p}embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state[f"{p}embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state[f"{p}pre_layrnorm.weight"],
        "visual.ln_pre.bias": state[f"{p}pre_layrnorm.bias"],
        "visual.ln_post.weight": state[f"{p}post_layernorm.weight"],
        "visual.ln_post.bias": state[f"{p}post_layernorm.bias"],
        "visual.proj": state["proj.weight"].t(),         # open_clip: x @ proj, with proj (width, embed_dim)
    }
    for i in range(cfg.backbone.vision["layers"]):
        src, dst = f"{p}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                     ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
            out[f"{dst}{b}.weight"] = state[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = state[f"{src}{a}.bias"]
        attn = f"{src}self_attn."
        out[f"{dst}attn.in_proj_weight"] = torch.cat([state[f"{attn}{x}_proj.base_layer.weight"] for x in "qkv"])
        out[f"{dst}attn.in_proj_bias"] = torch.cat([state[f"{attn}{x}_proj.base_layer.bias"] for x in "qkv"])
        for x in "qkv":
            out[f"{dst}attn.lora.{x}.A"] = state[f"{attn}{x}_proj.lora_A.default.weight"]
            out[f"{dst}attn.lora.{x}.B"] = state[f"{attn}{x}_proj.lora_B.default.weight"]
    head = cfg.heads[0]
    for n in range(len(cfg.head.hidden) + 1):        # head Sequential: Linear at 0, 3, 6, ...
        out[f"heads.{head}.{3 * n}.weight"] = state[f"mlp.fc{n + 1}.weight"]
        out[f"heads.{head}.{3 * n}.bias"] = state[f"mlp.fc{n + 1}.bias"]
    return {k: v.float().contiguous() for k, v in out.items()}


def import_official(path: str | Path, task: str, output: str, lora_alpha: float = RELEASE_LORA_ALPHA,
                    source: str | None = None) -> ArtifactMeta:
    """Convert a released PerceptCLIP ``.pth`` into a model artifact at ``output`` (local or fsspec URI)."""
    state = load_release_state_dict(path)
    cfg = infer_model_config(state, task, where=str(path), lora_alpha=lora_alpha)
    model = ClipLoraModel(cfg)
    try:
        model.load_state_dict(convert_state_dict(state, cfg), strict=True)
    except (KeyError, RuntimeError) as e:
        raise CheckpointLayoutError(f"{path}: tensors do not fit the inferred architecture: {e}") from None
    meta = ArtifactMeta.for_task(task, cfg, provenance={
        "source": source or "PerceptCLIP release checkpoint", "file": Path(path).name,
        "converted_by": "perceptclip import-official", "lora_alpha_assumed": lora_alpha,
    })
    save_artifact(model, meta, output)
    return meta


def _offline_message(name: str, repo: str, filename: str, task: str, cause: Exception) -> str:
    return (
        f"model {name!r} is the released checkpoint {filename} from the Hugging Face repository {repo}, "
        f"and it could not be fetched ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'offline'}). "
        f"On a machine with network, download https://huggingface.co/{repo}/resolve/main/{filename} "
        f"(or run `hf download {repo} {filename}` to fill the Hugging Face cache, then copy the cache here), "
        f"then convert it once: `perceptclip import-official {filename} --task {task} --output MODEL_DIR` "
        f"and pass --model MODEL_DIR (a local folder or s3:// URI)."
    )


def fetch_release(repo: str, filename: str, timeout: float = 5.0) -> str:
    """The release file, from the Hugging Face cache if it is there, else from the hub. The hub is asked
    once first, without retries: a machine that cannot reach it fails at once, where the download's own
    retries would take half a minute and warn at each one (``timeout``: what a network that drops the
    packets costs). A release file never changes, so a cached copy is used without asking the hub."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id=repo, filename=filename, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    get_hf_file_metadata(hf_hub_url(repo, filename), timeout=timeout, retry_on_errors=False)
    return hf_hub_download(repo_id=repo, filename=filename)


def release_artifact(name: str) -> str:
    """The built-in model ``name`` as a local artifact directory: its release fetched and converted once,
    then cached."""
    repo, filename, task = BUILTIN_MODELS[name]
    target = cache_dir() / "releases" / name
    if (target / CONFIG_FILE).exists():
        return str(target)
    try:
        local = fetch_release(repo, filename)
    except Exception as e:  # offline mode, no network, hub errors
        raise ArtifactError(_offline_message(name, repo, filename, task, e)) from None
    publish_once(target, lambda staging: import_official(local, task, str(staging),
                                                         source=f"huggingface.co/{repo}/{filename}"))
    return str(target)
