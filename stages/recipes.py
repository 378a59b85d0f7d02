"""The diffusion-training math: each micro-batch's random draws, and the recipes beyond the reference
(offset noise, min-SNR weighting, timestep sampling, v-prediction / zero-terminal-SNR, caption dropout, Huber
losses, debiased estimation).
Pure functions; `Recipe` applies them inside stages/train.py's draw_inputs and diffusion_losses. Every draw is a pure function
of (seed, micro-batch / step / position) through cache/sampler.py's `generator`, so resume stays exact, and
under torchrun draws are made for the global micro-batch and then sliced."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cache.sampler import generator as stream_generator
from stages.errors import UserError


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The CPU generator of one micro-batch's draws: a pure function of (seed, micro-batch index)."""
    return stream_generator(seed, "micro-batch", micro_step)


def draw_noise(shape: torch.Size, num_timesteps: int, generator: torch.Generator,
               rank_slice: tuple[int, int] | None = None):
    """(latent_eps, noise, timesteps) for a micro-batch of latents of `shape`, drawn in this order.

    rank_slice=(rank, world_size) under torchrun: `shape` is this rank's part of a global micro-batch of
    world_size × shape[0] samples; the draws are made for the global micro-batch and this rank's rows are
    returned, so every sample gets exactly the draws of one process training with the global batch."""
    if rank_slice is not None:
        rank, world = rank_slice
        rows = slice(rank * shape[0], (rank + 1) * shape[0])
        return tuple(x[rows] for x in draw_noise(torch.Size([shape[0] * world, *shape[1:]]), num_timesteps, generator))
    latent_eps = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    return latent_eps, noise, timesteps


def offset_noise(noise: torch.Tensor, offset: float, delta: torch.Tensor) -> torch.Tensor:
    """eps' = eps + offset * delta, delta ~ N(0,1) of shape (B, C, 1, 1): shifts each sample's channel means.

    Source: N. Guttenberg, "Diffusion with Offset Noise" (Crosslabs, 2023); diffusers'
    examples/text_to_image/train_text_to_image_sdxl.py (`--noise_offset`)."""
    return noise + offset * delta


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma)/SNR for an epsilon target, min(SNR, gamma)/(SNR + 1) for v.

    Source: Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy" (ICCV 2023, sec. 3.4);
    diffusers' examples/text_to_image/train_text_to_image.py (`--snr_gamma`). At SNR 0 (zero terminal SNR) the
    epsilon weight is its limit, 1."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def debiased_weights(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights 1/sqrt(SNR) for an epsilon target, 1/(SNR + 1) for v, SNR capped at 1000.

    Source: kohya sd-scripts library/custom_train_functions.py `apply_debiased_estimation` (Yu et al.,
    "Debias the Training of Diffusion Models", 2024)."""
    snr = torch.clamp(snr, max=1000)
    return 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr)


def huber_thresholds(timesteps: torch.Tensor, c: float, schedule: str, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The pseudo-Huber threshold of each sample from its timestep (CPU tensors; T = len(alphas_cumprod)).

    Source: kohya sd-scripts library/train_util.py `get_huber_threshold_if_needed` (huber_scale 1):
    constant c; exponential exp(-a·t) with a = -ln(c)/T, i.e. c^(t/T); snr (1 - c)/(1 + σ_t)² + c with
    σ_t = sqrt((1 - ᾱ_t)/ᾱ_t) (Khrapov et al., "Improving Diffusion Models's Data-Corruption Resistance
    using Scheduled Pseudo-Huber Loss", 2024)."""
    if schedule == "exponential":
        a = -math.log(c) / len(alphas_cumprod)
        return torch.exp(-a * timesteps)
    if schedule == "snr":
        ac = torch.index_select(alphas_cumprod, 0, timesteps)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full((len(timesteps),), c)


def conditional_loss(model_pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The elementwise loss: mse (pred - target)²; huber 2c(sqrt(d² + c²) - c), which tends to d² as c -> ∞;
    smooth_l1 2(sqrt(d² + c²) - c), which tends to d²/c. `huber_c` holds one c per sample.

    Source: kohya sd-scripts library/train_util.py `conditional_loss`."""
    if loss_type == "mse":
        return F.mse_loss(model_pred, target, reduction="none")
    c = huber_c.view(-1, *[1] * (model_pred.ndim - 1))
    root = torch.sqrt((model_pred - target) ** 2 + c ** 2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def mask_weights(mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights from masks (B, 1, h, w) in [0, 1]: each sample's mask divided by its mean, so a
    sample's loss stays a mean over its pixels, sum(m · loss) / sum(m) (an all-ones mask: weights of exactly 1;
    an all-zero mask: weights 0). kohya sd-scripts' masked loss weights by the mask without this normalisation."""
    return mask / mask.mean(dim=(1, 2, 3), keepdim=True).clamp(min=torch.finfo(mask.dtype).tiny)


def stratified_timesteps(num_timesteps: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """`window` timesteps, one uniform draw in each of `window` equal integer strata of [0, T), in a random order.

    Stratified sampling of t, as in the low-discrepancy sampler of Kingma et al., "Variational Diffusion
    Models" (NeurIPS 2021, appendix I.1), with an independent offset per stratum. With window > T several
    samples share a timestep."""
    order = torch.randperm(window, generator=generator)
    u = torch.rand(window, generator=generator, dtype=torch.float64)
    starts = torch.arange(window + 1) * num_timesteps // window  # stratum j = [starts[j], starts[j+1])
    sizes = (starts[1:] - starts[:-1]).clamp(min=1)
    t = starts[:-1] + (u * sizes).long()
    return t[order].clamp(max=num_timesteps - 1)


def logit_normal_timesteps(n: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps t = floor(sigmoid(z) * T), z ~ N(0, 1), in [0, T): denser in the middle of the schedule.

    Source: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
    (SD3, ICML 2024, sec. 3.1: logit-normal sampling with m = 0, s = 1), mapped to discrete DDPM timesteps."""
    z = torch.randn(n, generator=generator)
    return (torch.sigmoid(z) * num_timesteps).long().clamp(0, num_timesteps - 1)


def caption_dropout_mask(seed: int, positions: list[int], p: float) -> torch.Tensor:
    """Which samples (by stream position) train with the empty caption: one draw per (seed, position)."""
    return torch.tensor([bool(torch.rand((), generator=stream_generator(seed, "caption-dropout", pos)) < p)
                         for pos in positions], dtype=torch.bool)


def drop_captions(prompt_embeds, pooled_prompt_embeds, drop: torch.Tensor, empty: dict):
    """The batch's embeddings with the rows in `drop` replaced by the empty caption's."""
    drop = drop.to(prompt_embeds.device)
    return (torch.where(drop[:, None, None], empty["prompt_embeds"].to(prompt_embeds), prompt_embeds),
            torch.where(drop[:, None], empty["pooled_prompt_embeds"].to(pooled_prompt_embeds), pooled_prompt_embeds))


def _this_rank(x: torch.Tensor, rank_slice: tuple[int, int] | None) -> torch.Tensor:
    """This rank's rows of draws made for the global micro-batch (see draw_noise)."""
    if rank_slice is None:
        return x
    rank, world = rank_slice
    rows = len(x) // world
    return x[rank * rows:(rank + 1) * rows]


@dataclass
class Recipe:
    """The training step's options beyond the reference recipe; the defaults change nothing at all.

    Random draws stay pure functions of (seed, step, micro-batch, position): logit-normal timesteps and
    offset noise come from the micro-batch generator after draw_noise's draws; strata from (seed, optimizer
    step); caption dropout from (seed, position)."""
    seed: int = 0
    window: int = 1  # samples per optimizer step, all processes together: the strata of stratified sampling
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    timestep_sampling: str = "uniform"
    caption_dropout: float = 0.0
    empty_prompt: dict | None = None  # the cache's empty-caption embeddings, for caption dropout
    loss_type: str = "mse"  # mse, huber, smooth_l1
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    debiased_estimation: bool = False
    masked_loss: bool = False  # weight the per-pixel loss by the batch's "mask"
    cache_loss_weights: torch.Tensor | None = None  # several caches: LOSS_WEIGHT per cache, on the device
    cache_names: tuple = ()  # several caches: their names in the metrics
    cache_losses: torch.Tensor | None = None  # several caches: (caches, 2) loss sum and sample count, on the device
    _snr: torch.Tensor | None = field(default=None, repr=False)  # SNR per timestep, for min-SNR weights
    _alphas_cumprod: torch.Tensor | None = field(default=None, repr=False)  # on the CPU, for Huber thresholds

    def timesteps(self, drawn, batch, num_timesteps, generator, rank_slice=None) -> torch.Tensor:
        if self.timestep_sampling == "logit-normal":
            n = len(drawn) * (rank_slice[1] if rank_slice else 1)
            return _this_rank(logit_normal_timesteps(n, num_timesteps, generator), rank_slice).to(drawn.device)
        if self.timestep_sampling == "stratified":
            positions = batch["position"].cpu()
            t = torch.empty_like(positions)
            for step in positions.div(self.window, rounding_mode="floor").unique().tolist():
                rows = positions // self.window == step
                table = stratified_timesteps(num_timesteps, self.window, stream_generator(self.seed, "strata", step))
                t[rows] = table[positions[rows] % self.window]
            return t.to(drawn.device)
        return drawn

    def noise(self, noise, generator, rank_slice=None) -> torch.Tensor:
        if not self.noise_offset:
            return noise
        b, c = noise.shape[0] * (rank_slice[1] if rank_slice else 1), noise.shape[1]
        delta = _this_rank(torch.randn((b, c, 1, 1), generator=generator), rank_slice)
        return offset_noise(noise, self.noise_offset, delta.to(noise))

    def conditioning(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        if not self.caption_dropout:
            return prompt_embeds, pooled
        drop = caption_dropout_mask(self.seed, batch["position"].tolist(), self.caption_dropout)
        return drop_captions(prompt_embeds, pooled, drop, self.empty_prompt)

    def cached_inputs(self, batch) -> dict[str, torch.Tensor]:
        """The batch's tensors the loss reads beside the draws: its masks (--masked-loss), its caches (several)."""
        return {**({"mask": batch["mask"].float()} if self.masked_loss else {}),
                **({"cache": batch["cache"]} if self.cache_loss_weights is not None else {})}

    @property
    def state(self) -> list[torch.Tensor]:
        """The tensors `loss` accumulates into (CUDA graphs restore them after their warm-up runs)."""
        return [self.cache_losses] if self.cache_losses is not None else []

    def cache_loss_row(self) -> dict[str, float]:
        """Each cache's mean loss since the last call (weighted as trained, before its LOSS_WEIGHT), for metrics."""
        if self.cache_losses is None:
            return {}
        sums = self.cache_losses.tolist()
        self.cache_losses.zero_()
        return {f"loss/{name}": s / n for name, (s, n) in zip(self.cache_names, sums) if n}

    def loss_weights(self, noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (min-SNR × debiased estimation), computed from the drawn timesteps before the
        forward; None: none."""
        if self.min_snr_gamma is None and not self.debiased_estimation:
            return None
        if self._snr is None:  # once, on the CPU (later calls must not copy the schedule from the GPU)
            from diffusers.training_utils import compute_snr
            self._snr = compute_snr(noise_scheduler, torch.arange(noise_scheduler.config.num_train_timesteps))
        snr, prediction_type = self._snr[timesteps.cpu()], noise_scheduler.config.prediction_type
        weights = None if self.min_snr_gamma is None else min_snr_weights(snr, self.min_snr_gamma, prediction_type)
        if self.debiased_estimation:
            debiased = debiased_weights(snr, prediction_type)
            weights = debiased if weights is None else weights * debiased
        return weights

    def huber_thresholds(self, noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample Huber / smooth-L1 thresholds, computed on the CPU before the forward; None for mse."""
        if self.loss_type == "mse":
            return None
        if self._alphas_cumprod is None:  # once: add_noise moves the scheduler's table to the device
            self._alphas_cumprod = noise_scheduler.alphas_cumprod.detach().cpu()
        return huber_thresholds(timesteps.cpu(), self.huber_c, self.huber_schedule, self._alphas_cumprod)

    def loss(self, model_pred, target, weights: torch.Tensor | None = None, huber_c: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, cache: torch.Tensor | None = None) -> torch.Tensor:
        """The micro-batch's loss: the mean over elements (mse: F.mse_loss, as the reference), or with per-sample
        weights the weighted mean of per-sample means. `mask` (B, 1, h, w) weights pixels (mask_weights); `cache`
        (B,) says which cache each sample comes from: its loss is recorded per cache and scaled by its LOSS_WEIGHT."""
        if weights is None and self.loss_type == "mse" and mask is None and cache is None:
            return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        elementwise = conditional_loss(model_pred.float(), target.float(), self.loss_type, huber_c)
        if mask is not None:
            elementwise = elementwise * mask_weights(mask)
        if weights is None and cache is None:
            return elementwise.mean()
        per_sample = elementwise.mean(dim=(1, 2, 3)) * (1 if weights is None else weights)
        if cache is not None:
            self.cache_losses[:, 0].index_add_(0, cache, per_sample.detach())
            self.cache_losses[:, 1].index_add_(0, cache, torch.ones_like(per_sample))
            per_sample = per_sample * self.cache_loss_weights[cache]
        return per_sample.mean()


def make_recipe(seed: int, window: int, noise_offset: float, min_snr_gamma: float | None, timestep_sampling: str,
                caption_dropout: float, empty_prompt, cache: str, device: torch.device, loss_type: str = "mse",
                huber_c: float = 0.1, huber_schedule: str = "snr", debiased_estimation: bool = False,
                masked_loss: bool = False) -> Recipe:
    """The Recipe of train's options; `empty_prompt` is CacheReader.empty_prompt() (needed for caption dropout).
    `window` = samples per optimizer step, all processes together. `cache` is --cache: given several times, its
    LOSS_WEIGHTs scale each cache's loss, which is also recorded per cache."""
    from cache.mixture import cache_names
    from stages.config import parse_cache_specs
    specs = parse_cache_specs(cache)
    mixture = {} if len(specs) == 1 else {
        "cache_loss_weights": torch.tensor([lw for _, _, lw in specs], device=device),
        "cache_names": tuple(cache_names([p for p, _, _ in specs])),
        "cache_losses": torch.zeros(len(specs), 2, device=device)}
    empty = None
    if caption_dropout > 0:
        if empty_prompt is None:
            raise UserError(f"--caption-dropout needs the empty caption's embedding, which cache {specs[0][0]} "
                            "predates: run the same `encode` command again (it adds the embedding and leaves "
                            "the samples as they are)")
        empty = {k: v.to(device) for k, v in empty_prompt.items()}
    return Recipe(seed=seed, window=window, noise_offset=noise_offset, min_snr_gamma=min_snr_gamma,
                  timestep_sampling=timestep_sampling, caption_dropout=caption_dropout, empty_prompt=empty,
                  loss_type=loss_type, huber_c=huber_c, huber_schedule=huber_schedule,
                  debiased_estimation=debiased_estimation, masked_loss=masked_loss, **mixture)


def configure_noise_scheduler(noise_scheduler, prediction_type: str | None, zero_terminal_snr: bool, log=None):
    """The model's noise schedule with --prediction-type / --rescale-betas-zero-snr (the same object without);
    `log` gets a note where zero terminal SNR meets an epsilon target.

    Zero terminal SNR: Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (WACV 2024):
    rescaled betas (diffusers' rescale_betas_zero_snr) and, for sampling (validation images), trailing
    timestep spacing."""
    overrides = {}
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    if zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    configured = type(noise_scheduler).from_config(noise_scheduler.config, **overrides) if overrides else noise_scheduler
    if log and zero_terminal_snr and configured.config.prediction_type == "epsilon":
        log("note: with zero terminal SNR the last timestep's input is pure noise, so an epsilon target teaches "
            "nothing there; Lin et al. pair --rescale-betas-zero-snr with --prediction-type v_prediction")
    return configured
