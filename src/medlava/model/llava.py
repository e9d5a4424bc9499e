"""LLaVA glue: image features from the vision tower, through the projector, replace image-token embeddings."""

from __future__ import annotations

import torch
from torch import nn

from medlava.model.config import LlavaConfig
from medlava.model.decoder import AttentionBackend, Decoder, Linear
from medlava.model.projector import Projector
from medlava.model.vision import VisionTower


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.projector = Projector(
            cfg.projector_type, cfg.vision.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias
        )
        self.decoder = Decoder(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.decoder.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] preprocessed pixels -> [N, image_tokens, hidden] decoder-space features."""
        feats = self.vision_tower.features(pixels.to(self.device, self.dtype), self.config.vision_feature_layer)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        return self.projector(feats)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image-placeholder positions filled, in order, by `image_features` rows.

        `image_mask` (default: wherever the image-token id is) marks the placeholder positions;
        an image-token id outside it is embedded as an ordinary token, as transformers does for
        one the model generated. Without features and mask, an image-token id inside the
        vocabulary is such a token too (a decode step feeding back a generated one).
        """
        if image_mask is not None:
            is_image = image_mask
        elif image_features is None and 0 <= self.config.image_token_id < self.config.text.vocab_size:
            is_image = torch.zeros_like(input_ids, dtype=torch.bool)
        else:
            is_image = input_ids == self.config.image_token_id
        # The placeholder id may lie outside the vocabulary (original LLaVA uses -200), so never look it up.
        embeds = self.decoder.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum())
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise ValueError(f"prompt has {n_slots} image-token positions but the images give {n_feats} features")
        if n_slots:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        backend: AttentionBackend | None = None,
        last_only: bool = False,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, T]; images given as pixels or already-encoded features.

        `image_mask` marks the placeholder positions (see `embed`).
        """
        if pixels is not None:
            image_features = self.encode_images(pixels)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.decoder(self.embed(input_ids, image_features, image_mask), positions, backend)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)
