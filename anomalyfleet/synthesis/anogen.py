"""AnoGen (ECCV 2024) on `diffusers`: learn a defect as one text embedding from a few masked
examples, then paint it into chosen regions of normal images.

learn: textual inversion of one placeholder token on a frozen Stable Diffusion 1.x/2.x layout
(tokenizer, CLIP text encoder, VAE, UNet, scheduler in subfolders), the noise-prediction loss
weighted by the defect mask at latent resolution. Only the new token's vector is trained.

generate: DDIM with classifier-free guidance from pure noise; after every step the latents outside
the region are replaced by the normal image's latents noised to the next timestep, so only the
region is painted and what surrounds it stays the normal image.

Both text-to-image UNets (4 input channels) and inpainting UNets (9: latents, mask, masked-image
latents) work.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from anomalyfleet import storage
from anomalyfleet.device import select_device
from anomalyfleet.errors import ConfigError, DataError
from anomalyfleet.manifest import atomic_write, atomic_write_bytes
from anomalyfleet.synthesis.procedural import Synthesis, check_color, to_grey, wants_grey
from anomalyfleet.synthesis.regions import RegionSpec, sample_region


# --- loading -------------------------------------------------------------------------------------


def resolve_pipeline_source(source: str | Path) -> str:
    """A hub id or local directory as is; an object-storage prefix mirrored into the node's cache
    (a pipeline is a directory of subfolders, not one object)."""
    source = str(source)
    if storage.is_remote(source):
        return str(storage.cached_prefix(source))
    local = source.removeprefix("file://")
    # A hub id is "owner/name"; anything shaped like a path must exist, or the hub's repo-id
    # validation error would hide the real problem (a mistyped directory).
    if local.startswith(("/", ".", "~")) or local.count("/") > 1 or Path(local).expanduser().exists():
        path = Path(local).expanduser()
        if not path.is_dir():
            raise ConfigError(f"diffusion pipeline directory not found: {source}")
        return str(path)
    return local


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict
    source: str

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale

    @property
    def inpainting(self) -> bool:
        return self.unet.config.in_channels == 9

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "Components":
        for module in (self.text_encoder, self.vae, self.unet):
            current = next(module.parameters()).dtype
            # Only cast when needed: diffusers warns on every dtype cast, even a no-op one.
            module.to(device=device, dtype=dtype) if current != dtype else module.to(device=device)
        return self


def load_components(source: str | Path, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Components:
    """The frozen parts of a Stable Diffusion directory or hub id; `from_pretrained` per subfolder,
    so text-to-image and inpainting checkpoints load alike and the safety checker is not needed."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_pipeline_source(source)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        scheduler_config = dict(DDIMScheduler.load_config(path, subfolder="scheduler"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: not a loadable Stable Diffusion layout ({exc})") from exc
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    components = Components(tokenizer, text_encoder, vae, unet, scheduler_config, str(source))
    if device is not None:
        components.to(device, dtype)
    return components


def text_encoder_fingerprint(text_encoder: torch.nn.Module, rows: int = 1024) -> str:
    """Identifies a text encoder by its first token embeddings: an embedding only makes sense in
    the encoder it was learned in, and this catches the wrong one without hashing the whole model."""
    weight = text_encoder.get_input_embeddings().weight[:rows].detach().float().cpu().contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


# --- the learned embedding -----------------------------------------------------------------------


def placeholder_token(tokenizer, placeholder: str) -> str:
    """The token the learned vector lives under. A placeholder that is already a word of the
    tokenizer (the spec's own example, `*`) cannot be that token: its text tokenises to another id
    (`*</w>`), so the vector would never be seen. Such a placeholder gets a token of its own, and
    prompts name that token wherever the placeholder stands."""
    vocab = tokenizer.get_vocab()
    taken = placeholder in vocab and placeholder not in getattr(tokenizer, "get_added_vocab", dict)()
    return f"<anomalyfleet:{placeholder}>" if taken else placeholder


def add_placeholder(components: Components, placeholder: str, vector: torch.Tensor | None = None,
                    init_word: str = "defect") -> int:
    """Add the placeholder's token (or reuse it) and set its row; returns its id."""
    tokenizer, encoder = components.tokenizer, components.text_encoder
    token = placeholder_token(tokenizer, placeholder)
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens(token)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set below
    token_id = tokenizer.convert_tokens_to_ids(token)
    if tokenizer(token, add_special_tokens=False).input_ids != [token_id]:
        raise ConfigError(f"placeholder {placeholder!r} does not tokenise to one token of its own; choose another "
                          "(e.g. <crack>)")
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        if vector is None:
            ids = tokenizer(init_word, add_special_tokens=False).input_ids
            if not ids:
                raise ConfigError(f"initialiser word {init_word!r} has no tokens")
            # A word split into several tokens starts from their mean: close to all of them.
            vector = table[ids].mean(0)
        if vector.shape != table[token_id].shape:
            raise ConfigError(f"embedding has {vector.shape[-1]} values but this text encoder expects {table.shape[1]}")
        table[token_id] = vector.to(table)
    return token_id


def save_embedding(path: str | Path, placeholder: str, vector: torch.Tensor, metadata: dict) -> Path:
    """diffusers' textual-inversion format ({token: vector}, so `pipe.load_textual_inversion(path)`
    works), plus a JSON sidecar with where it came from. The sidecar goes first: the .pt existing is
    what marks the embedding done, so a writer killed in between leaves nothing that looks finished."""
    path = Path(path)
    state = {placeholder: vector.detach().float().cpu().clone()}
    atomic_write_bytes(path.with_name(path.name + ".json"), json.dumps(metadata, indent=1, sort_keys=True).encode())
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path


def load_embedding(path: str | Path) -> tuple[str, torch.Tensor, dict]:
    source = str(path)
    remote = storage.is_remote(source)
    path = storage.local_path_for(source) if remote else storage.parse(source).path
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"embedding not found: {path}") from exc
    if not isinstance(state, dict) or len(state) != 1:
        raise ConfigError(f"{path}: expected one {{token: vector}} entry")
    (placeholder, vector), = state.items()
    # The sidecar beside the .pt where it is stored: the node cache only holds the .pt.
    sidecar = source + ".json" if remote else str(path.with_name(path.name + ".json"))
    metadata = json.loads(storage.read_bytes(sidecar)) if storage.exists(sidecar) else {}
    return placeholder, vector.reshape(-1), metadata


# --- learn ---------------------------------------------------------------------------------------


def _config_from_dict(cls, data: dict | None, what: str):
    """A settings dataclass from a recipe mapping; an unknown key is a typo, so it is an error."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**data)


@dataclass
class LearnConfig:
    """Defaults from the AnoGen paper (SPEC §3): lr 5e-3 × batch, about 6 000 steps."""

    placeholder: str | None = None  # default "<defect-name>"
    init_word: str = "defect"
    prompt: str = "{}"  # the generation prompt is the placeholder alone, so train on it alone
    steps: int = 6000
    batch_size: int = 1
    learning_rate: float = 5e-3
    scale_lr: bool = True  # lr × batch, as the reference
    weight_decay: float = 1e-2
    resolution: int | None = None  # default: the UNet's native size (256 for the paper's LDM)
    hflip: bool = True
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_dict(cls, data: dict) -> "LearnConfig":
        return _config_from_dict(cls, data, "learn")


# More steps may be asked for on resume (and checkpointing or device changed); anything else
# changing would mix two runs.
RESUMABLE_LEARN_SETTINGS = ("steps", "checkpoint_every", "device")


def resume_key(config: dict) -> dict:
    """The learning settings a resumed run must share with the run it continues."""
    return {k: v for k, v in config.items() if k not in RESUMABLE_LEARN_SETTINGS}


def masked_noise_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MSE over latent cells weighted by the defect mask (B, 1, h, w); cells with weight 0 do not
    exist for the loss. Normalised by the weight so small and large defects train at one rate."""
    se = (pred.float() - target.float()).pow(2) * weight
    return se.sum() / (weight.sum() * pred.shape[1]).clamp_min(1e-8)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) in [0, 1] to latent cells: the share of each cell that is defect."""
    return F.interpolate(mask.float(), size=size, mode="area")


def _to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.array(images) if isinstance(images, np.ndarray) else images)
    return tensor.float().permute(0, 3, 1, 2) / 127.5 - 1.0


def support_samples(spec: str) -> list:
    """The defect images with masks of a support spec; checked before a pipeline is loaded."""
    from anomalyfleet.data import parse_data_spec

    samples = [s for s in parse_data_spec(spec) if s.label == 1 and s.mask is not None]
    if not samples:
        raise DataError(f"{spec}: no defect images with masks to learn from")
    return samples


def load_support(support: str | list, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The few real defect images with masks, (N, R, R, 3) uint8 and (N, R, R) float, from a data
    spec or the samples `support_samples` found for one."""
    from PIL import Image

    from anomalyfleet.data.transforms import load_image, load_mask

    samples = support_samples(support) if isinstance(support, str) else support
    images, masks = [], []
    for s in samples:
        images.append(np.asarray(load_image(s.image).resize((resolution, resolution), Image.BICUBIC)))
        mask = Image.fromarray(load_mask(s.mask, s.mask_threshold).astype(np.uint8) * 255)
        masks.append(np.asarray(mask.resize((resolution, resolution), Image.BILINEAR), np.float32) / 255.0)
    return np.stack(images), np.stack(masks)


class _TokenOverride:
    """Puts a trainable vector in place of one token's embedding, through a forward hook, so only
    that vector gets a gradient and the (frozen, shared) embedding table is never written during
    training."""

    def __init__(self, components: Components, token_id: int, vector: torch.Tensor):
        self.token_id = token_id
        self.vector = vector
        self.handle = components.text_encoder.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        ids = inputs[0]
        where = (ids == self.token_id).unsqueeze(-1)
        return torch.where(where, self.vector.to(output.dtype), output)

    def remove(self):
        self.handle.remove()


def encode_prompt(components: Components, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    tok = components.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    return components.text_encoder(ids)[0]


def _unet_input(components: Components, noisy: torch.Tensor, mask_lat: torch.Tensor | None,
                masked_latents: torch.Tensor | None) -> torch.Tensor:
    if not components.inpainting:
        return noisy
    return torch.cat([noisy, (mask_lat > 0).to(noisy.dtype), masked_latents], dim=1)


@torch.no_grad()
def _encode_latents(components: Components, images: torch.Tensor, sample: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    dist = components.vae.encode(images).latent_dist
    latents = dist.sample(generator=generator) if sample else dist.mean
    return latents * components.vae.config.scaling_factor


def noise_loss_step(components: Components, scheduler, latents: torch.Tensor, weight: torch.Tensor,
                    hidden: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    masked_latents: torch.Tensor | None = None) -> torch.Tensor:
    """One textual-inversion loss evaluation (the part of a training step with a gradient)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    model_in = _unet_input(components, noisy, weight, masked_latents)
    pred = components.unet(model_in, timesteps, encoder_hidden_states=hidden).sample
    kind = scheduler.config.get("prediction_type", "epsilon")
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return masked_noise_loss(pred, target, weight)


def learn_embedding(pipeline: str | Path | Components, support: str | tuple[np.ndarray, np.ndarray],
                    output: str | Path, config: LearnConfig | None = None, checkpoint_dir: str | Path | None = None,
                    progress: bool = True, defect_name: str | None = None,
                    on_step: Callable[[int], None] | None = None, metadata: dict | None = None) -> Path:
    """Textual inversion of one defect type. Resumes from `checkpoint_dir/latest.pt` when present.
    `on_step(steps_done)` runs after each step, its checkpoint written (the library job's fault
    injection hooks in there). `metadata` goes into the embedding's sidecar too."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    config = config or LearnConfig()
    device = select_device(config.device)
    if isinstance(support, str):
        support = support_samples(support)  # a wrong spec fails in a second, not after minutes of loading weights
    components = pipeline if isinstance(pipeline, Components) else load_components(pipeline)
    components.to(device)
    name = defect_name or Path(output).stem
    placeholder = config.placeholder or f"<{name}>"
    resolution = config.resolution or components.native_resolution
    images, masks = load_support(support, resolution) if isinstance(support, list) else support
    if images.shape[1:3] != (resolution, resolution):
        raise DataError(f"support images are {images.shape[1]}x{images.shape[2]}, expected {resolution}x{resolution}")

    scheduler = DDPMScheduler.from_config(components.scheduler_config)
    token_id = add_placeholder(components, placeholder, init_word=config.init_word)
    vector = torch.nn.Parameter(components.text_encoder.get_input_embeddings().weight[token_id].detach().clone().float())
    lr = config.learning_rate * (config.batch_size if config.scale_lr else 1)
    optimizer = torch.optim.AdamW([vector], lr=lr, weight_decay=config.weight_decay)

    # The frozen VAE sees each support image once (and its mirror): cache the latent distribution.
    pixels = _to_model_range(images).to(device)
    mask_t = torch.as_tensor(masks, dtype=torch.float32)[:, None].to(device)
    if config.hflip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
        mask_t = torch.cat([mask_t, mask_t.flip(-1)])
    with torch.no_grad():
        dist = components.vae.encode(pixels).latent_dist
        mean, std = dist.mean, dist.std
        latent_size = tuple(mean.shape[-2:])
        weights = latent_mask(mask_t, latent_size)
        masked_latents = (_encode_latents(components, pixels * (1 - (mask_t > 0.5).float()))
                          if components.inpainting else None)
    if float(weights.sum()) == 0:
        raise DataError("support masks are empty: nothing to learn the defect from")

    start = 0
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    ckpt_path = Path(checkpoint_dir) / "latest.pt" if checkpoint_dir else None
    if ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # plain values: no code runs
        if state["placeholder"] != placeholder or resume_key(state["config"]) != resume_key(asdict(config)):
            raise ConfigError(f"{ckpt_path}: checkpoint from different settings; delete it to start over")
        with torch.no_grad():
            vector.copy_(state["vector"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = state["step"]

    hidden_prompt = [config.prompt.format(placeholder_token(components.tokenizer, placeholder))] * config.batch_size
    override = _TokenOverride(components, token_id, vector)
    scaling = components.vae.config.scaling_factor
    losses: list[float] = []
    bar = tqdm(total=config.steps, initial=start, desc=f"learn {placeholder}", unit="step", disable=not progress)
    try:
        for step in range(start, config.steps):
            pick = torch.randint(0, len(mean), (config.batch_size,), generator=generator)
            eps = torch.randn(mean[pick].shape, generator=generator).to(device)
            latents = (mean[pick] + std[pick] * eps) * scaling
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator).to(device)
            hidden = encode_prompt(components, hidden_prompt, device)
            loss = noise_loss_step(components, scheduler, latents, weights[pick], hidden, noise, timesteps,
                                   masked_latents[pick] if masked_latents is not None else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            done = step + 1
            if ckpt_path is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                checkpoint = {"step": done, "vector": vector.detach().cpu(), "optimizer": optimizer.state_dict(),
                              "generator": generator.get_state(), "placeholder": placeholder,
                              "config": asdict(config)}
                atomic_write(ckpt_path, lambda handle: torch.save(checkpoint, handle))
            if on_step is not None:
                on_step(done)
    finally:
        bar.close()
        override.remove()
    add_placeholder(components, placeholder, vector.detach())
    metadata = {
        "placeholder": placeholder, "defect": name, "init_word": config.init_word, "pipeline": components.source,
        "text_encoder": text_encoder_fingerprint(components.text_encoder), "resolution": resolution,
        "steps": max(config.steps, start), "resumed_at_step": start, "support_images": int(len(images)), "config": asdict(config),
        "final_loss": float(np.mean(losses[-50:])) if losses else None, "versions": _versions(),
        # Which process learned it (a Ray task's worker, or the CLI), for tracing a library back.
        "learned_by": {"host": os.uname().nodename, "pid": os.getpid(), "device": str(device)},
        **(metadata or {}),
    }
    # Saved under its token: a stock pipeline (load_textual_inversion) refuses a word it already has.
    return save_embedding(output, placeholder_token(components.tokenizer, placeholder), vector, metadata)


def _versions() -> dict:
    import diffusers
    import transformers

    import anomalyfleet

    return {"anomalyfleet": anomalyfleet.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


# --- generate ------------------------------------------------------------------------------------


@dataclass
class GenerateConfig:
    """Defaults from the AnoGen paper (SPEC §3): DDIM, 50 steps, guidance 10."""

    steps: int = 50
    guidance: float = 10.0
    eta: float = 0.0
    resolution: int | None = None
    negative_prompt: str = ""
    prompt: str = "{}"
    paste_back: bool = True  # outside the region, keep the normal image's own pixels (no VAE round trip)
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    region: dict = field(default_factory=dict)  # default region when the recipe gives none
    # As for the procedural generators: a pipeline trained on colour photos can tint a defect on a
    # greyscale product; auto keeps defects on greyscale images grey.
    color: str = "auto"

    def __post_init__(self):
        check_color(self.color)

    @classmethod
    def from_dict(cls, data: dict | None) -> "GenerateConfig":
        return _config_from_dict(cls, data, "anogen")


class AnoGenGenerator:
    """A loaded pipeline plus one learned defect embedding; `generate` has the procedural generators'
    signature so the library job treats them alike."""

    name = "anogen"

    def __init__(self, components: Components, placeholder: str, vector: torch.Tensor, metadata: dict | None = None,
                 config: GenerateConfig | None = None, device: str | torch.device = "auto"):
        self.config = config or GenerateConfig()
        self.device = select_device(device)
        dtype = self.config.dtype
        self.dtype = (torch.float16 if self.device.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
        self.placeholder = placeholder
        self.metadata = metadata or {}
        expected = self.metadata.get("text_encoder")
        self.token_id = add_placeholder(components, placeholder, vector)
        # Fingerprinted as learned (with the token, before any cast): fp16-rounded weights hash
        # differently, which on CUDA would flag every embedding as learned elsewhere.
        loaded_encoder = text_encoder_fingerprint(components.text_encoder)
        self.components = components.to(self.device, self.dtype)
        if expected and expected != loaded_encoder:
            warnings.warn(f"embedding {placeholder} was learned with a different text encoder; results will be poor")
        self.default_region = RegionSpec.from_dict(self.config.region) if self.config.region else RegionSpec(
            shape="ellipse", size=(0.1, 0.3), aspect=(0.5, 2.0), rotation=(0, 180))
        with torch.no_grad():
            prompts = [self.config.negative_prompt,
                       self.config.prompt.format(placeholder_token(components.tokenizer, placeholder))]
            self._hidden = encode_prompt(components, prompts, self.device)

    @classmethod
    def load(cls, pipeline: str | Path, embedding: str | Path, settings: dict | None = None,
             device: str | torch.device = "auto") -> "AnoGenGenerator":
        placeholder, vector, metadata = load_embedding(embedding)
        config = GenerateConfig.from_dict(settings)
        components = load_components(pipeline)
        return cls(components, placeholder, vector, metadata, config, device)

    def settings(self) -> dict:
        out = asdict(self.config)
        out.update({"placeholder": self.placeholder, "pipeline": self.components.source,
                    "embedding_defect": self.metadata.get("defect"),
                    # What ran, not what was asked ("auto"): a library resumed on other hardware
                    # shows fp16 and fp32 samples apart.
                    "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type})
        return out

    def versions(self) -> dict:
        return _versions()

    @torch.no_grad()
    def generate(self, image: np.ndarray, seed: int, region: RegionSpec | None = None,
                 foreground: np.ndarray | None = None) -> Synthesis:
        from PIL import Image

        rng = np.random.default_rng(seed)
        h, w = image.shape[:2]
        area = sample_region(rng, region or self.default_region, h, w, foreground)
        res = self.config.resolution or self.components.native_resolution
        small = np.asarray(Image.fromarray(image).resize((res, res), Image.BICUBIC))
        mask_small = np.asarray(Image.fromarray(area.mask.astype(np.uint8) * 255).resize((res, res), Image.BILINEAR)) > 0
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        out_small = self.paint(small, mask_small, generator)
        out = out_small if (h, w) == (res, res) else np.asarray(Image.fromarray(out_small).resize((w, h), Image.BICUBIC))
        if self.config.paste_back:
            out = np.where(area.mask[..., None], out, image)
        grey = wants_grey(self.config.color, image)
        if grey:
            painted = (to_grey(out.astype(np.float32)) + 0.5).clip(0, 255)
            out = np.where(area.mask[..., None], painted, out)
        return Synthesis(out.astype(np.uint8), area.mask.copy(), area, {"resolution": res, "grey": grey})

    def paint(self, image: np.ndarray, mask: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """The defect painted into `mask` of an (R, R, 3) uint8 image: DDIM + CFG + latent blending."""
        latents, _, _ = self.paint_latents(image, mask, generator)
        c = self.components
        decoded = c.vae.decode(latents / c.vae.config.scaling_factor).sample
        return ((decoded[0].float().clamp(-1, 1) + 1) * 127.5 + 0.5).permute(1, 2, 0).cpu().numpy().astype(np.uint8)

    @torch.no_grad()
    def paint_latents(self, image: np.ndarray, mask: np.ndarray, generator: torch.Generator):
        """Final latents, the normal image's latents and the latent region mask."""
        from diffusers import DDIMScheduler

        c, cfg, device, dtype = self.components, self.config, self.device, self.dtype
        scheduler = DDIMScheduler.from_config(c.scheduler_config)
        scheduler.set_timesteps(cfg.steps, device=device)
        pixels = _to_model_range(image[None]).to(device, dtype)
        known = _encode_latents(c, pixels)
        m = (latent_mask(torch.as_tensor(mask, dtype=torch.float32)[None, None], tuple(known.shape[-2:])) > 0)
        # Any latent cell the region touches is repainted, so no defect pixel is pinned to the old image.
        m = m.to(device, dtype)
        masked_latents = None
        if c.inpainting:
            hole = torch.as_tensor(mask, dtype=dtype, device=device)[None, None]
            masked_latents = _encode_latents(c, pixels * (1 - hole)).repeat(2, 1, 1, 1)

        def randn():
            return torch.randn(known.shape, generator=generator).to(device, dtype)

        timesteps = scheduler.timesteps
        latents = randn() * scheduler.init_noise_sigma
        latents = m * latents + (1 - m) * scheduler.add_noise(known, randn(), timesteps[:1])
        hidden = self._hidden.to(dtype)
        for i, t in enumerate(timesteps):
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            model_in = _unet_input(c, model_in, m.repeat(2, 1, 1, 1), masked_latents)
            uncond, cond = c.unet(model_in, t, encoder_hidden_states=hidden).sample.chunk(2)
            noise_pred = uncond + cfg.guidance * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, eta=cfg.eta, generator=generator).prev_sample
            # Outside the region, the normal image at the noise level the next step expects.
            if i + 1 < len(timesteps):
                outside = scheduler.add_noise(known, randn(), timesteps[i + 1:i + 2])
            else:
                outside = known
            latents = m * latents + (1 - m) * outside
        return latents, known, m


def learn_from_recipe(recipe_path: str | Path, defects: Iterable[str] | None = None, progress: bool = True) -> dict[str, str]:
    """Learn the embeddings a recipe's AnoGen types need (those with `support`), where the library
    job would put them; used by `anomalyfleet synth learn --recipe`."""
    from anomalyfleet.synthesis.library import (check_learned_from, embedding_cache_dir, learn_defect_embedding,
                                                learn_library_embedding, load_recipe, output_root, publish_embedding)

    recipe = load_recipe(recipe_path)
    root = output_root(recipe.output)
    wanted = set(defects or [])
    out = {}
    for d in recipe.defects:
        if d.generator != "anogen" or not d.support or (wanted and d.name not in wanted):
            continue
        if not d.embedding:
            # Into the library, where the library job looks for it; one learned from other support
            # examples is refused there, as the library job would refuse it.
            check_learned_from(recipe, root, d)
            if storage.is_remote(root):
                out[d.name] = learn_library_embedding(recipe, root, d, progress)
                continue
        if d.embedding and storage.is_remote(d.embedding):
            # Learned on this node, then uploaded (a Path of an s3:// URI would be a local folder "s3:").
            local = embedding_cache_dir(recipe, d.embedding, d) / f"{d.name}.pt"
            learn_defect_embedding(recipe, d, local, progress)
            out[d.name] = publish_embedding(local, d.embedding)
            continue
        target = Path(d.embedding) if d.embedding else Path(root) / "embeddings" / f"{d.name}.pt"
        out[d.name] = str(learn_defect_embedding(recipe, d, target, progress))
    return out


__all__ = [
    "AnoGenGenerator", "Components", "GenerateConfig", "LearnConfig", "RESUMABLE_LEARN_SETTINGS", "add_placeholder",
    "learn_embedding", "learn_from_recipe", "load_components", "load_embedding", "masked_noise_loss",
    "placeholder_token", "resume_key", "save_embedding",
]
