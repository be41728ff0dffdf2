"""AnoGen on a tiny random Stable-Diffusion-layout pipeline built in the test (no downloads)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anomalyfleet.errors import ConfigError  # noqa: E402
from anomalyfleet.synthesis.anogen import (  # noqa: E402
    AnoGenGenerator, GenerateConfig, LearnConfig, _TokenOverride, _unet_input, add_placeholder, encode_prompt,
    latent_mask, learn_embedding, load_components, load_embedding, masked_noise_loss,
)
from anomalyfleet.synthesis.regions import RegionSpec  # noqa: E402
from tests.tiny_diffusion import build_tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one thread is many times faster than two contending.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="module")
def support():
    rng = np.random.default_rng(0)
    images = rng.integers(60, 200, (2, 32, 32, 3)).astype(np.uint8)
    masks = np.zeros((2, 32, 32), np.float32)
    masks[:, 8:20, 10:22] = 1
    images[:, 8:20, 10:22] = (230, 30, 30)
    return images, masks


@pytest.fixture(scope="module")
def embedding(pipeline, support, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "crack.pt"
    return learn_embedding(pipeline, support, out, LearnConfig(steps=8, device="cpu"), progress=False, defect_name="crack")


def test_loss_is_masked(pipeline):
    """A latent cell outside the mask does not change the loss or the embedding's gradient."""
    c = load_components(pipeline)
    token = add_placeholder(c, "<crack>")
    vector = torch.nn.Parameter(c.text_encoder.get_input_embeddings().weight[token].detach().clone())
    override = _TokenOverride(c, token, vector)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    pixel_mask = torch.zeros(1, 1, 32, 32)
    pixel_mask[..., 4:14, 6:20] = 1
    weight = latent_mask(pixel_mask, (16, 16))
    assert weight.sum() > 0 and (weight == 0).any()
    target = torch.randn_like(latents)
    changed = target + 5 * torch.randn_like(target) * (weight == 0)

    def gradient(t):
        vector.grad = None
        hidden = encode_prompt(c, ["<crack>"], torch.device("cpu"))
        pred = c.unet(_unet_input(c, latents, weight, None), torch.tensor([500]), encoder_hidden_states=hidden).sample
        loss = masked_noise_loss(pred, t, weight)
        loss.backward()
        return loss.detach(), vector.grad.clone()

    loss_a, grad_a = gradient(target)
    loss_b, grad_b = gradient(changed)
    override.remove()
    assert grad_a.abs().sum() > 0
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    # and the weight really is the mask: only in-mask cells reach the loss
    pred = torch.zeros_like(target, requires_grad=True)
    masked_noise_loss(pred, target, weight).backward()
    assert (pred.grad[:, :, weight[0, 0] == 0] == 0).all() and (pred.grad[:, :, weight[0, 0] > 0] != 0).any()


def test_learn_resume_and_embedding_file(pipeline, support, embedding, tmp_path):
    placeholder, vector, meta = load_embedding(embedding)
    assert placeholder == "<crack>" and vector.shape == (16,) and meta["steps"] == 8 and meta["defect"] == "crack"
    fresh = load_components(pipeline)
    start = add_placeholder(fresh, "<crack>")
    assert not torch.equal(fresh.text_encoder.get_input_embeddings().weight[start], vector), "learning moved nothing"

    # Stopped after 4 of 8 steps and resumed: the same vector as one uninterrupted run.
    config = LearnConfig(steps=8, checkpoint_every=2, device="cpu")
    ckpt = tmp_path / "ckpt"
    learn_embedding(pipeline, support, tmp_path / "half.pt", LearnConfig(steps=4, checkpoint_every=2, device="cpu"),
                    checkpoint_dir=ckpt, progress=False, defect_name="crack")
    resumed = learn_embedding(pipeline, support, tmp_path / "full.pt", config, checkpoint_dir=ckpt, progress=False,
                              defect_name="crack")
    assert torch.allclose(load_embedding(resumed)[1], vector, atol=1e-6)

    # The file is diffusers' textual-inversion format: a stock pipeline loads it.
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    c = load_components(pipeline)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=DDIMScheduler.from_config(c.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(embedding))
    token = pipe.tokenizer.convert_tokens_to_ids("<crack>")
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[token], vector)


def test_generate_seeded_and_local(pipeline, embedding):
    rng = np.random.default_rng(1)
    image = rng.integers(40, 220, (64, 64, 3)).astype(np.uint8)
    region = RegionSpec(shape="box", size=(0.25, 0.3), aspect=(1, 1))
    settings = {"steps": 6, "resolution": 64}
    gen = AnoGenGenerator.load(pipeline, embedding, settings, device="cpu")
    a, b, other = gen.generate(image, 11, region), gen.generate(image, 11, region), gen.generate(image, 12, region)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, other.image)
    assert np.array_equal(a.image[~a.mask], image[~a.mask]), "paste-back keeps every outside pixel"
    assert (a.image[a.mask] != image[a.mask]).any()

    # Without paste-back: outside the region the final latents are exactly the normal image's, so the
    # decoded pixels differ from the input only by the VAE round trip (GroupNorm in the decoder is
    # global, so "only by" is in distribution, not pixel for pixel).
    raw = AnoGenGenerator.load(pipeline, embedding, {**settings, "paste_back": False}, device="cpu")
    small_mask = a.mask
    latents, known, m = raw.paint_latents(image, small_mask, torch.Generator().manual_seed(11))
    assert (m == 0).any() and (m == 1).any()
    assert torch.equal(latents * (1 - m), known * (1 - m))
    assert not torch.allclose(latents * m, known * m)
    out = raw.generate(image, 11, region)
    c = raw.components
    with torch.no_grad():
        x = torch.as_tensor(image).float().permute(2, 0, 1)[None] / 127.5 - 1
        round_trip = c.vae.decode(c.vae.encode(x).latent_dist.mean).sample
    round_trip = ((round_trip[0].clamp(-1, 1) + 1) * 127.5 + 0.5).permute(1, 2, 0).numpy().astype(np.uint8)
    from scipy import ndimage

    far = ~ndimage.binary_dilation(out.mask, iterations=6)
    diff = np.abs(out.image.astype(int) - round_trip.astype(int)).mean(-1)
    assert diff[far].mean() < 0.5 * diff[out.mask].mean()


def test_generate_keeps_defects_on_greyscale_images_grey(pipeline, embedding):
    rng = np.random.default_rng(2)
    grey_image = np.repeat(rng.integers(40, 220, (64, 64, 1)), 3, axis=-1).astype(np.uint8)
    region = RegionSpec(shape="box", size=(0.3, 0.4), aspect=(1, 1))
    settings = {"steps": 4, "resolution": 64}
    auto = AnoGenGenerator.load(pipeline, embedding, settings, device="cpu").generate(grey_image, 5, region)
    rgb = AnoGenGenerator.load(pipeline, embedding, {**settings, "color": "rgb"}, device="cpu").generate(
        grey_image, 5, region)
    assert auto.details["grey"] and not rgb.details["grey"]
    assert np.array_equal(auto.mask, rgb.mask)
    channels = rgb.image[rgb.mask].astype(int)
    assert (channels.max(-1) - channels.min(-1)).max() > 0, "the random pipeline does tint: the check can fail"
    assert np.array_equal(auto.image[..., 0], auto.image[..., 1]) and np.array_equal(auto.image[..., 1], auto.image[..., 2])
    assert np.array_equal(auto.image[~auto.mask], grey_image[~auto.mask])
    with pytest.raises(ConfigError, match="color must be one of"):
        AnoGenGenerator.load(pipeline, embedding, {"color": "sepia"}, device="cpu")


def test_inpainting_unet(tmp_path, support):
    path = build_tiny_pipeline(tmp_path / "inpaint", inpainting=True)
    emb = learn_embedding(path, support, tmp_path / "e.pt", LearnConfig(steps=2, device="cpu"), progress=False)
    gen = AnoGenGenerator.load(path, emb, GenerateConfig(steps=3).__dict__, device="cpu")
    assert gen.components.inpainting
    out = gen.generate(support[0][0], 3)
    assert out.image.shape == (32, 32, 3) and out.mask.any()


def test_pipeline_and_embedding_from_object_storage(pipeline, embedding, s3_env):
    """An s3:// pipeline is a prefix of subfolders (mirrored whole); an s3:// embedding one object
    whose sidecar is read beside it."""
    from anomalyfleet import storage

    base = s3_env.uri(f"anogen/{time.time_ns()}")
    for path in Path(pipeline).rglob("*"):
        if path.is_file():
            storage.upload_file(path, storage.join(base, "sd", path.relative_to(pipeline).as_posix()))
    for name in (embedding.name, embedding.name + ".json"):
        storage.upload_file(embedding.with_name(name), storage.join(base, name))
    gen = AnoGenGenerator.load(storage.join(base, "sd"), storage.join(base, embedding.name), {"steps": 2},
                               device="cpu")
    placeholder, vector, meta = load_embedding(embedding)
    assert gen.placeholder == placeholder and gen.metadata == meta
    assert torch.equal(gen.components.text_encoder.get_input_embeddings().weight[gen.token_id], vector)


def test_a_missing_pipeline_directory_or_support_fails_before_any_weights_load(tmp_path):
    from anomalyfleet.errors import ConfigError, DataError
    from anomalyfleet.synthesis.anogen import learn_embedding, resolve_pipeline_source

    for source in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(ConfigError, match="diffusion pipeline directory not found"):
            resolve_pipeline_source(source)
    assert resolve_pipeline_source("owner/model-name") == "owner/model-name"  # a hub id passes untouched
    assert resolve_pipeline_source(f"file://{tmp_path}") == str(tmp_path)
    with pytest.raises(DataError, match="not found"):
        learn_embedding(str(tmp_path / "nope"), f"folder:{tmp_path / 'no-support'}", tmp_path / "e.pt", progress=False)


def test_a_half_precision_load_does_not_mistake_its_own_text_encoder(pipeline, embedding):
    """On CUDA the pipeline is cast to fp16; the learned embedding's encoder fingerprint was taken
    in fp32, so it must be compared with the weights as loaded, before the cast."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = AnoGenGenerator.load(pipeline, embedding, {"steps": 2, "dtype": "float16"}, device="cpu")
    assert gen.dtype == torch.float16
    assert not [w for w in caught if "different text encoder" in str(w.message)]


def test_a_placeholder_that_is_already_a_word_still_learns(pipeline, support, tmp_path):
    """The spec's example placeholder `*` is a word of CLIP's tokenizer, whose text tokenises to
    another id (`*</w>`): reusing its row learned nothing. Here `c` (a word of the tiny tokenizer,
    written `c</w>` when alone) must move its vector as a new placeholder does, and the file must
    load in a stock pipeline."""
    from anomalyfleet.synthesis.anogen import placeholder_token

    c = load_components(pipeline)
    assert "c" in c.tokenizer.get_vocab() and placeholder_token(c.tokenizer, "c") != "c"
    start = c.text_encoder.get_input_embeddings().weight[c.tokenizer.convert_tokens_to_ids("defect</w>")].detach().clone()
    path = learn_embedding(pipeline, support, tmp_path / "c.pt", LearnConfig(steps=8, device="cpu", placeholder="c"),
                           progress=False, defect_name="crack")
    _, vector, meta = load_embedding(path)
    assert meta["placeholder"] == "c" and (vector - start).abs().max() > 1e-3  # weight decay alone: ~1e-5
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    fresh = load_components(pipeline)
    pipe = StableDiffusionPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                                   unet=fresh.unet, scheduler=DDIMScheduler.from_config(fresh.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path))
    generator = AnoGenGenerator(load_components(pipeline), *load_embedding(path), device="cpu")
    assert generator.placeholder == placeholder_token(c.tokenizer, "c")
