"""The decoder LLM with Mixture-of-Depths routing of vision tokens.

The weights, norms, MLPs and rotary frequencies are those of a transformers causal LM (found
through an architecture registry); the attention is ours so that it can read a static,
preallocated KV cache with a validity mask, place tokens at positions the caller chooses,
and route vision tokens per frame. Keys are cached *after* RoPE; a cache is re-based after
eviction by rotating the kept keys by their position change (see docs in exporter/BUNDLE.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onsight.exporter.config import ModelConfig
from onsight.runtime.errors import CheckpointError


@dataclass(frozen=True)
class ArchSpec:
    """Where a causal LM keeps its parts; a new architecture is one registry entry."""

    layers: Callable[[nn.Module], nn.ModuleList]
    embed: Callable[[nn.Module], nn.Embedding]
    final_norm: Callable[[nn.Module], nn.Module]
    lm_head: Callable[[nn.Module], nn.Module]
    rotary: Callable[[nn.Module], nn.Module]
    config_class: str  # transformers class name of the config
    model_class: str  # transformers class name of the causal LM


def _llama_like(config_class: str, model_class: str) -> ArchSpec:
    return ArchSpec(
        layers=lambda m: m.model.layers,
        embed=lambda m: m.model.embed_tokens,
        final_norm=lambda m: m.model.norm,
        lm_head=lambda m: m.lm_head,
        rotary=lambda m: m.model.rotary_emb,
        config_class=config_class,
        model_class=model_class,
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _llama_like("LlamaConfig", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    "MistralForCausalLM": _llama_like("MistralConfig", "MistralForCausalLM"),
}


def arch_spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise CheckpointError(
            f"architecture {name!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        ) from None


def build_hf_lm(decoder_config: dict) -> nn.Module:
    """A randomly initialised transformers causal LM from its config dict."""
    import transformers

    spec = arch_spec((decoder_config.get("architectures") or [""])[0])
    cfg_cls = getattr(transformers, spec.config_class)
    cfg = cfg_cls(**{k: v for k, v in decoder_config.items() if k != "model_type"})
    cfg._attn_implementation = "eager"
    return getattr(transformers, spec.model_class)(cfg)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LayerExpert(nn.Module):
    """VideoLLM-MoD's router: one score per token, hidden -> 1."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).squeeze(-1)


# A prime below 2**24 (so every hash is exact in float32) with P % 3 == 2, which makes
# x -> x**3 mod P a bijection: distinct positions get distinct scores, so top-k has no ties
# and picks the same tokens in torch and onnxruntime.
_HASH_P = 16_777_199


def _cube_mod(x: torch.Tensor) -> torch.Tensor:
    return torch.remainder(torch.remainder(x * x, _HASH_P) * x, _HASH_P)


def position_hash(positions: torch.Tensor, layer: int) -> torch.Tensor:
    """The random router's scores: a fixed pseudo-random permutation of positions, salted by
    the layer. Integer arithmetic (not frac(sin(x) * 43758.5453), whose float rounding differs
    between torch and onnxruntime) keeps the export's parity exact. (N,) int64 -> (N,) float32."""
    x = torch.remainder(positions * 2_654_435 + 40_503 * (layer + 1), _HASH_P)
    x = _cube_mod(torch.remainder(_cube_mod(x) * 48_271 + 11, _HASH_P))
    return x.to(torch.float32)


def evenly_spaced_scores(n: int | torch.Tensor, k: int) -> torch.Tensor:
    """The uniform router's scores: the top k are the evenly spaced indices ceil(m * n / k),
    m < k (the j with j * k mod n < k: one per stride of n / k), ranked in index order
    ahead of all others; every score is distinct. (n,) float32."""
    j = torch.arange(n, dtype=torch.int64)
    later = (torch.remainder(j * k, n) >= k).to(torch.int64) * n  # not one of the k
    return -(j + later).to(torch.float32)


def kept_indices(score: torch.Tensor, k: int, keep_last: bool) -> torch.Tensor:
    """The k tokens a routed layer keeps, by score over the last dim (one frame's tokens);
    with keep_last the frame's last token always comes first, and the other k - 1 are the
    top scores among the rest (a static slice, TopK and Concat in the graph)."""
    if not keep_last:
        return torch.topk(score, k, dim=-1).indices
    n = score.shape[-1]
    last = torch.full((*score.shape[:-1], 1), n - 1, dtype=torch.int64, device=score.device)
    if k == 1:
        return last
    return torch.cat([last, torch.topk(score[..., : n - 1], k - 1, dim=-1).indices], dim=-1)


# A routed layer's cache: (k, v), each (kv_heads, capacity, head_dim), and a bool mask (capacity,)
Past = tuple[torch.Tensor, torch.Tensor]


class ModDecoder(nn.Module):
    """Step functions over an HF causal LM: text tokens, or text + one frame with MoD."""

    def __init__(self, lm: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        spec = arch_spec(cfg.architecture)
        self.layers = spec.layers(lm)
        self.embed = spec.embed(lm)
        self.final_norm = spec.final_norm(lm)
        self.lm_head = spec.lm_head(lm)
        rotary = spec.rotary(lm)
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        c = lm.config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.routed = tuple(cfg.mod.layers)
        self.router = cfg.mod.router
        self.k = cfg.k
        self.experts = nn.ModuleDict(
            {str(i): LayerExpert(c.hidden_size) for i in self.routed}
            if cfg.has_layer_experts
            else {}
        )

    # ---- pieces ----
    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (heads, T, head_dim); positions: (T,) int64."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, head_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(x.dtype)
        sin = (emb.sin() * self.attention_scaling).to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def attention(
        self,
        layer: nn.Module,
        h: torch.Tensor,
        positions: torch.Tensor,
        past: Past,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: (T, hidden) normed input. Returns (output (T, hidden), new_k, new_v (Hkv, T, D))."""
        attn = layer.self_attn
        T = h.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        rep = H // Hkv
        q = attn.q_proj(h).view(T, H, D).transpose(0, 1)  # (H, T, D)
        k = attn.k_proj(h).view(T, Hkv, D).transpose(0, 1)  # (Hkv, T, D)
        v = attn.v_proj(h).view(T, Hkv, D).transpose(0, 1)
        q = self.rope(q, positions)
        k = self.rope(k, positions)
        past_k, past_v = past
        keys = torch.cat([past_k, k], dim=1)  # (Hkv, C + T, D)
        values = torch.cat([past_v, v], dim=1)
        # Causality among new tokens by position, so their order in the batch does not matter
        # (MoD's top-k returns tokens in score order and needs no sort).
        causal = positions[None, :] <= positions[:, None]  # (T, T)
        allowed = torch.cat([mask[None, :].expand(T, -1), causal], dim=1)  # (T, C + T)
        qg = q.reshape(Hkv, rep * T, D)  # query heads grouped by their kv head
        scores = torch.matmul(qg, keys.transpose(1, 2)) * attn.scaling  # (Hkv, rep*T, C+T)
        scores = scores.view(Hkv, rep, T, -1)
        scores = scores.masked_fill(~allowed[None, None], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs.view(Hkv, rep * T, -1), values)  # (Hkv, rep*T, D)
        out = out.view(H, T, D).transpose(0, 1).reshape(T, H * D)
        return attn.o_proj(out), k, v

    def block(
        self, i: int, x: torch.Tensor, positions: torch.Tensor, past: Past, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder layer on the tokens it processes: x (T, hidden) -> (T, hidden)."""
        layer = self.layers[i]
        a, k, v = self.attention(layer, layer.input_layernorm(x), positions, past, mask)
        x = x + a
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, k, v

    def scores(
        self, i: int, vis: torch.Tensor, novelty: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Routing scores of one frame's vision tokens at layer i: (N,).

        vis (N, hidden); novelty (N,); positions (N,) int64, the tokens' cache positions.
        """
        if self.router == "learned":
            if str(i) not in self.experts:
                raise CheckpointError(
                    "router 'learned' needs LayerExpert weights; this checkpoint has none "
                    "(export with --router novelty or norm)"
                )
            return self.experts[str(i)](vis)
        if self.router == "norm":
            return vis.norm(dim=-1)
        if self.router == "random":
            return position_hash(positions, i)
        if self.router == "uniform":
            return evenly_spaced_scores(vis.shape[0], self.k)
        return novelty

    def logits_last(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(x[-1:]))[0]  # (vocab,)

    # ---- steps (the exported graphs) ----
    def text_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        past: list[Past],
        masks: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Text tokens through every layer (text is never routed).

        input_ids, positions: (T,). Returns logits of the last token (vocab,) and per layer
        the new keys and values (Hkv, T, D) that the caller writes into its cache.
        """
        x = self.embed(input_ids)  # (T, hidden)
        new_k, new_v = [], []
        for i in range(len(self.layers)):
            x, k, v = self.block(i, x, positions, past[i], masks[i])
            new_k.append(k)
            new_v.append(v)
        return self.logits_last(x), new_k, new_v

    def frame_step(
        self,
        input_ids: torch.Tensor,
        frame_embeds: torch.Tensor,
        prev_frame_embeds: torch.Tensor,
        positions: torch.Tensor,
        past: list[Past],
        masks: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The text tokens before a frame, then its N vision tokens, with MoD on routed layers.

        input_ids: (Tt,); frame_embeds, prev_frame_embeds: (N, hidden); positions: (Tt + N,).
        Returns logits after the last vision token, new keys/values per layer ((Hkv, Tt+N, D)
        on dense layers, (Hkv, Tt+k, D) on routed ones: text first, then the kept vision
        tokens in score order), and for each routed layer the kept token indices (k,).
        """
        Tt = input_ids.shape[0]
        N = frame_embeds.shape[0]
        x = torch.cat([self.embed(input_ids), frame_embeds.to(self.embed.weight.dtype)], dim=0)
        # Temporal novelty (DyCoke's signal): 1 - cos to the same token of the previous frame.
        # A tiny index-dependent offset breaks exact ties identically in torch and ONNX.
        cos = F.cosine_similarity(frame_embeds.float(), prev_frame_embeds.float(), dim=-1, eps=1e-6)
        novelty = 1.0 - cos - 1e-6 * torch.arange(N, dtype=torch.float32)
        new_k, new_v, kept = [], [], []
        for i in range(len(self.layers)):
            if i not in self.routed or self.k >= N:
                x, k, v = self.block(i, x, positions, past[i], masks[i])
                if i in self.routed:  # r = 1 on a routed layer: every token kept, in order
                    kept.append(torch.arange(N, dtype=torch.int64))
            elif self.k == 0:
                # r = 0: vision tokens skip this layer (early exit); only the text runs
                out_text, k, v = self.block(i, x[:Tt], positions[:Tt], past[i], masks[i])
                x = torch.cat([out_text, x[Tt:]], dim=0)
                kept.append(torch.zeros(0, dtype=torch.int64))
            else:
                text, vis = x[:Tt], x[Tt:]  # (Tt, hidden), (N, hidden)
                score = self.scores(i, vis, novelty, positions[Tt:])  # (N,)
                # (k,), per frame, never across frames
                idx = kept_indices(score, self.k, self.cfg.mod.keep_last)
                sel = vis[idx]  # (k, hidden)
                pos = torch.cat([positions[:Tt], positions[Tt:][idx]])
                out, k, v = self.block(i, torch.cat([text, sel], dim=0), pos, past[i], masks[i])
                out_text, out_sel = out[:Tt], out[Tt:]
                if str(i) in self.experts and self.cfg.mod.gate == "sigmoid":
                    # Mixture-of-Depths: x + w * f(x) with w the LayerExpert's sigmoid weight.
                    # A model trained with experts keeps that gate when another router only
                    # *selects* (the ablations change the choice, nothing else); models
                    # without experts (training-free routers) and straight-through gates
                    # use w = 1.
                    gate = score[idx] if self.router == "learned" else self.experts[str(i)](sel)
                    w = torch.sigmoid(gate).unsqueeze(-1).to(out_sel.dtype)
                    out_sel = sel + w * (out_sel - sel)
                vis = vis.scatter(0, idx.unsqueeze(-1).expand(-1, vis.shape[1]), out_sel)
                x = torch.cat([out_text, vis], dim=0)
                kept.append(idx)
            new_k.append(k)
            new_v.append(v)
        return self.logits_last(x), new_k, new_v, kept
