"""Export a model (SD 1.x / 2.x layout, ours or a real checkpoint) to a diffusers folder, and import one.

    model = load_model(None, "sd-v1-5.safetensors")
    export_diffusers(model, "sd15-diffusers/")
    StableDiffusionPipeline.from_pretrained("sd15-diffusers/")     # offline: everything is in the folder

The folder holds ``model_index.json``, ``unet/``, ``vae/`` (diffusers' own layouts, converted by diffusers'
single-file converters from the model's original layout), ``text_encoder/`` (a transformers ``CLIPTextModel``: the
blocks the model runs, so SD2's penultimate layer is the exported model's last, as in Stability's diffusers
folders), ``tokenizer/`` (``vocab.json`` and ``merges.txt`` made from open_clip's BPE vocabulary, padding as the
model pads: end-of-text for SD1, ``!`` (id 0) for SD2) and ``scheduler/`` (PNDM with SD's settings; DDIM with
zero-SNR rescaling and trailing spacing for zero-terminal-SNR models). :func:`import_diffusers` reads such a
folder back into this project's model (the config made from the folder's component configs, the weights renamed
by inverting diffusers' own converters). Needs the ``diffusers`` extra (diffusers and transformers) at export and
import time only, never at sampling time.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ldm.convert.layouts import to_hf_clip_text_state_dict

__all__ = ["diffusers_modules", "export_diffusers", "import_diffusers"]

log = logging.getLogger(__name__)


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - the extra is installed in the tests
        raise ImportError(f"exporting a diffusers folder needs diffusers and transformers ({e}): "
                          "pip install 'ldm[diffusers]'") from e


def _model_params(model: Any) -> dict:
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError("the model has no config (model.config): load it with ldm.convert.load_model")
    return config["model"]["params"]


def _device(state: dict) -> torch.device:
    return next(iter(state.values())).device


def _unet(model: Any, params: dict, state: dict) -> Any:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    unet = params["unet_config"]["params"]
    if unet.get("adm_in_channels") or unet.get("num_classes") is not None:
        raise ValueError("diffusers export handles SD 1.x / 2.x UNets; this one takes a vector input (SDXL-like), "
                         "which it does not export yet")
    original = {"model": {"params": params}}
    image_size = int(params.get("image_size", 64)) * model.downsample_factor
    config = create_unet_diffusers_config_from_ldm(original, state, image_size=image_size)
    if unet.get("num_head_channels", -1) not in (-1, None):  # heads per level from the head width
        config["attention_head_dim"] = [unet["model_channels"] * m // unet["num_head_channels"]
                                        for m in unet["channel_mult"]]
    config["sample_size"] = int(params.get("image_size", 64))
    _key_map(convert_ldm_unet_checkpoint, {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")},
             config)  # every weight has a place
    weights = convert_ldm_unet_checkpoint(state, config)
    with torch.device(_device(state)):
        module = UNet2DConditionModel(**config)
    module.load_state_dict(weights, strict=True, assign=True)
    return module


def _vae(model: Any, params: dict, state: dict) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    original = {"model": {"params": params}}
    config = create_vae_diffusers_config_from_ldm(original, state, image_size=int(params.get("image_size", 64))
                                                  * model.downsample_factor, scaling_factor=float(model.scale_factor))
    _key_map(convert_ldm_vae_checkpoint, {k: v for k, v in state.items() if k.startswith("first_stage_model.")},
             config)
    weights = convert_ldm_vae_checkpoint(state, config)
    with torch.device(_device(state)):
        module = AutoencoderKL(**config)
    module.load_state_dict(weights, strict=True, assign=True)
    return module


def _text_encoder(encoder: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    tower = encoder.model
    block = tower.transformer.resblocks[0]
    activation = "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    state = {k: v.detach().float() for k, v in encoder.state_dict().items()
             if not k.startswith(("model.text_projection", "model.logit_scale"))
             and not any(k.startswith(f"model.transformer.resblocks.{i}.")
                         for i in range(encoder.layers_run, encoder.num_layers))}
    config = CLIPTextConfig(vocab_size=tower.vocab_size, hidden_size=encoder.width,
                            intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=encoder.layers_run,
                            num_attention_heads=block.attn.num_heads,
                            max_position_embeddings=tower.positional_embedding.shape[0], hidden_act=activation,
                            layer_norm_eps=tower.ln_final.eps, projection_dim=encoder.width,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=encoder.pad_id)
    with torch.device(_device(state)):
        module = CLIPTextModel(config)
    weights = to_hf_clip_text_state_dict(state, position_ids=False)
    if not any(k.startswith("text_model.") for k in module.state_dict()):  # transformers >= 5 names
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    missing, unexpected = module.load_state_dict(weights, strict=False, assign=True)
    missing, unexpected = ([k for k in keys if not k.endswith("position_ids")] for keys in (missing, unexpected))
    if missing or unexpected:
        raise ValueError(f"text encoder export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module


def _write_tokenizer(folder: Path, encoder: Any) -> None:
    """CLIPTokenizer files from open_clip's BPE vocabulary (the same ids the encoder uses)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert vocab.index("<|endoftext|>") == encoder.tokenizer.eot_token_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    pad = "<|endoftext|>" if encoder.pad == "eot" else "!"
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": encoder.max_length,
         "do_lower_case": True, "add_prefix_space": False}, indent=2))


def _scheduler(params: dict) -> tuple[str, dict]:
    if params.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"beta_schedule {params['beta_schedule']!r} has no diffusers scheduler setting here; "
                         "only SD's 'linear' (diffusers' scaled_linear) is exported")
    prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[params.get("parameterization", "eps")]
    common = {"num_train_timesteps": int(params.get("timesteps", 1000)),
              "beta_start": float(params.get("linear_start", 0.00085)),
              "beta_end": float(params.get("linear_end", 0.012)), "beta_schedule": "scaled_linear",
              "prediction_type": prediction, "steps_offset": 1, "set_alpha_to_one": False, "trained_betas": None,
              "clip_sample": False}  # SD's own scheduler files say so; DDIM/DDPM would clip x0 to [-1, 1] otherwise
    if params.get("zero_terminal_snr"):
        return "DDIMScheduler", {**common, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return "PNDMScheduler", {**common, "skip_prk_steps": True}


def diffusers_modules(model: Any) -> tuple[Any, Any, Any]:
    """The model's UNet, VAE and text encoder as diffusers ``UNet2DConditionModel``, ``AutoencoderKL`` and
    transformers ``CLIPTextModel`` (float32; built on the meta device for a model that lives there), each loaded
    strictly from the model's weights."""
    _require_diffusers()
    params = _model_params(model)
    if model.cond_stage_model is None or not hasattr(model.cond_stage_model, "tokenize_prompts"):
        raise ValueError("diffusers export handles models with one text encoder (cond_stage_config, SD 1.x / 2.x)")
    if model.conditioning_key != "crossattn":
        raise ValueError("diffusers export handles text-to-image models; this one is an inpainting model")
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    state = {k: v if v.device.type == "meta" else v.cpu() for k, v in state.items()}
    with warnings.catch_warnings():  # diffusers deprecates the image_size argument its converters still read
        warnings.simplefilter("ignore", FutureWarning)
        unet, vae = _unet(model, params, state), _vae(model, params, state)
    return unet, vae, _text_encoder(model.cond_stage_model)


def export_diffusers(model: Any, folder: str | os.PathLike) -> Path:
    """Write ``model`` (a loaded SD 1.x / 2.x-layout ``LatentDiffusion``) as a diffusers
    ``StableDiffusionPipeline`` folder; returns the folder. Weights are saved as safetensors, float32."""
    _require_diffusers()
    import diffusers
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty: export into a new folder")
    params = _model_params(model)
    unet, vae, text_encoder = diffusers_modules(model)
    encoder = model.cond_stage_model
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    _write_tokenizer(folder / "tokenizer", encoder)
    CLIPTokenizer.from_pretrained(folder / "tokenizer")  # the files load
    scheduler_class, scheduler_config = _scheduler(params)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": scheduler_class, "_diffusers_version": diffusers.__version__, **scheduler_config}, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", scheduler_class],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    log.info("exported a diffusers folder to %s", folder)
    return folder


# ------------------------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------------------------

def _key_map(convert: Any, state: dict, *args: Any) -> dict[str, str]:
    """diffusers key -> our key, learnt by running diffusers' converter (ours -> diffusers) over tensors that
    each hold their own index (the converters only rename and reshape)."""
    keys = list(state)
    markers = {k: torch.full((1,) * state[k].ndim, float(i)) for i, k in enumerate(keys)}  # ndim is all it reads
    converted = convert(markers, *args)
    mapping = {d: keys[int(t.reshape(-1)[0])] for d, t in converted.items() if t.numel()}
    missing = sorted(set(keys) - set(mapping.values()))
    if missing:
        raise ValueError(f"diffusers' layout has no place for {len(missing)} weights of this model "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it is not an SD 1.x / "
                         "2.x architecture diffusers knows")
    return mapping


def _text_arch(config: Any) -> tuple[str, str]:
    """The open_clip arch and layer of a transformers CLIPTextConfig: an arch with as many blocks ("last") or one
    more ("penultimate": SD2 folders hold the 23 blocks SD2 runs of ViT-H-14's 24)."""
    import open_clip

    from ldm.models.text_encoder import register_text_archs

    register_text_archs()
    found = {}
    preferred = ("ViT-L-14", "ViT-H-14", "ViT-bigG-14")  # the names SD's own configs use
    for name in [*preferred, *open_clip.list_models()]:
        text = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
        if (text.get("width"), text.get("heads"), text.get("context_length", 77), text.get("vocab_size", 49408),
                text.get("hf_model_name")) != (config.hidden_size, config.num_attention_heads,
                                               config.max_position_embeddings, config.vocab_size, None):
            continue
        if text.get("layers") == config.num_hidden_layers:
            found.setdefault("last", name)
        elif text.get("layers") == config.num_hidden_layers + 1:
            found.setdefault("penultimate", name)
    for layer in ("last", "penultimate"):
        if layer in found:
            return found[layer], layer
    raise ValueError(f"no open_clip text architecture has width {config.hidden_size}, {config.num_attention_heads} "
                     f"heads and {config.num_hidden_layers} (or one more) blocks")


def _ldm_config(unet: dict, vae: dict, text: Any, scheduler: dict, pad: str) -> dict:
    """Our model config for a diffusers folder's component configs."""
    channels = list(unet["block_out_channels"])
    base = channels[0]
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    head_options = ({"num_heads": heads} if isinstance(heads, int)
                    else {"num_head_channels": channels[0] // heads[0]})
    if not isinstance(heads, int) and any(c // h != channels[0] // heads[0] for c, h in zip(channels, heads)):
        raise ValueError(f"UNet heads {heads} for channels {channels} have no single head width")
    depth = unet.get("transformer_layers_per_block", 1)
    if unet.get("addition_embed_type") or unet.get("class_embed_type"):
        raise ValueError("diffusers import handles SD 1.x / 2.x UNets (no vector input)")
    arch, layer = _text_arch(text)
    prediction = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[scheduler.get("prediction_type", "epsilon")]
    if scheduler.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"scheduler beta_schedule {scheduler.get('beta_schedule')!r} is not SD's scaled_linear")
    vae_channels = list(vae["block_out_channels"])
    return {"model": {"target": "ldm.model.LatentDiffusion", "params": {
        "parameterization": prediction, "timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "linear_start": float(scheduler.get("beta_start", 0.00085)),
        "linear_end": float(scheduler.get("beta_end", 0.012)),
        "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False)),
        "scale_factor": float(vae.get("scaling_factor", 0.18215)), "image_size": int(unet["sample_size"]),
        "channels": int(unet["in_channels"]), "conditioning_key": "crossattn",
        "unet_config": {"target": "ldm.models.unet.UNetModel", "params": {
            "image_size": int(unet["sample_size"]), "in_channels": unet["in_channels"],
            "out_channels": unet["out_channels"], "model_channels": base,
            "attention_resolutions": [2 ** i for i, t in enumerate(unet["down_block_types"]) if "CrossAttn" in t],
            "num_res_blocks": unet["layers_per_block"], "channel_mult": [c // base for c in channels],
            **head_options, "use_spatial_transformer": True,
            "use_linear_in_transformer": bool(unet.get("use_linear_projection", False)),
            "transformer_depth": depth if isinstance(depth, int) else list(depth),
            "context_dim": unet["cross_attention_dim"], "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": vae["latent_channels"], "ddconfig": {
                "double_z": True, "z_channels": vae["latent_channels"], "resolution": vae.get("sample_size", 256),
                "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": vae_channels[0],
                "ch_mult": [c // vae_channels[0] for c in vae_channels], "num_res_blocks": vae["layers_per_block"],
                "attn_resolutions": [], "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.models.text_encoder.OpenCLIPTextEncoder", "params": {
            "arch": arch, "layer": layer, "pad": pad, "quick_gelu": text.hidden_act == "quick_gelu",
            "projection": layer == "penultimate", "freeze": True}},
    }}}


def import_diffusers(folder: str | os.PathLike) -> Any:
    """A diffusers ``StableDiffusionPipeline`` folder (SD 1.x / 2.x) as this project's ``LatentDiffusion`` in the
    original layout (``model.state_dict()`` saves as an SD checkpoint). SD2 folders hold 23 of ViT-H-14's 24 text
    blocks (SD2 runs the penultimate one): the 24th block and the text projection, never run, are zero."""
    _require_diffusers()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.convert.build import build_model
    from ldm.convert.layouts import text_encoder_state_dict
    from ldm.io import check_state_dict

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: pass a diffusers pipeline folder")
    # weights from .safetensors only: a folder someone else made must not hand torch.load a pickle
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, use_safetensors=True)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pad = "eot" if tokenizer.pad_token_id in (None, tokenizer.eos_token_id) else "zero"
    config = _ldm_config(dict(unet.config), dict(vae.config), text.config, scheduler, pad)
    model = build_model(config)
    ours = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for prefix, module, convert, extra in (
            ("model.diffusion_model.", unet, convert_ldm_unet_checkpoint, dict(unet.config)),
            ("first_stage_model.", vae, convert_ldm_vae_checkpoint, dict(vae.config))):
        part = {k: v for k, v in ours.items() if k.startswith(prefix)}
        mapping = _key_map(convert, part, extra)
        for key, value in module.state_dict().items():
            state[mapping[key]] = value.reshape(ours[mapping[key]].shape)
    encoder = model.cond_stage_model
    text_state = {f"cond_stage_model.{k}": v for k, v in text_encoder_state_dict(text.state_dict()).items()
                  if not k.endswith("position_ids")}
    for key, value in ours.items():  # the blocks and projection SD2 never runs
        if key.startswith("cond_stage_model.") and key not in text_state and encoder.layer == "penultimate":
            text_state[key] = torch.zeros_like(value)
    state.update(text_state)
    state.update({k: v for k, v in ours.items() if k not in state and not k.startswith(
        ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))})  # the schedule buffers
    check_state_dict(ours, state, str(folder))
    model.load_state_dict(state, strict=True)
    model.config = config
    log.info("imported the diffusers folder %s", folder)
    return model.eval().requires_grad_(False)
