"""The training forward and the loss of the demo model.

The forward is batched (B streams at once) but computes exactly what the streaming step
computes: in a routed layer each frame keeps its top-k vision tokens by the LayerExpert's
score, kept tokens become x + sigmoid(score) * (block(x) - x) (with the straight-through gate,
x + block(x) - x forward and the sigmoid's gradient back), skipped ones pass unchanged, text
is always processed, and attention is causal over the tokens that layer processes. The top-k
is not differentiable; the sigmoid weight gives the routers their gradient (MoD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onsight.exporter.decoder import kept_indices
from onsight.exporter.demo.data import IGNORE
from onsight.exporter.model import StreamingModel
from onsight.runtime.synthetic.grammar import COLOURS

VISION_RMS = 0.1  # frame tokens' per-dimension RMS cap (text embeddings start near 0.02)


def _rope_tables(dec: nn.Module, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, D) of ModDecoder.rope for positions pos (B, T), computed once."""
    freqs = pos.float()[..., None] * dec.inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos() * dec.attention_scaling, emb.sin() * dec.attention_scaling


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Batched form of ModDecoder.rope: x (B, heads, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _block(
    dec: nn.Module,
    i: int,
    x: torch.Tensor,
    pos: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    key_ok: torch.Tensor | None,
) -> torch.Tensor:
    """ModDecoder.block for a batch: x (B, T, hidden) at positions pos (B, T).

    key_ok (B, T) marks the tokens this layer processes; a query never attends to others.
    """
    layer = dec.layers[i]
    attn = layer.self_attn
    B, T, _ = x.shape
    H, Hkv, D = dec.num_heads, dec.num_kv_heads, dec.head_dim
    h = layer.input_layernorm(x)
    q = _rope(attn.q_proj(h).view(B, T, H, D).transpose(1, 2), *rope)  # (B, H, T, D)
    k = _rope(attn.k_proj(h).view(B, T, Hkv, D).transpose(1, 2), *rope)  # (B, Hkv, T, D)
    v = attn.v_proj(h).view(B, T, Hkv, D).transpose(1, 2)
    k = k.repeat_interleave(H // Hkv, dim=1)  # query head j reads kv head j // rep
    v = v.repeat_interleave(H // Hkv, dim=1)
    allowed = pos[:, :, None] >= pos[:, None, :]  # (B, T, T) causal by position
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=attn.scaling)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def batched_hidden(
    model: StreamingModel,
    ids: torch.Tensor,
    frames: torch.Tensor,
    frame_pos: torch.Tensor,
    frame_tokens: list[torch.Tensor] | None = None,
    router_scores: list[torch.Tensor] | None = None,
    taps: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Final hidden states (B, L, hidden) of padded streams, routed as the streaming step.

    ids (B, L) with the <v> id at vision slots; frames (B, F, S, S, 3) uint8; frame_pos
    (B, F, N) the sequence positions of each frame's vision tokens. `taps` {layer: None}
    is filled with the hidden states (B, L, hidden) at the input of those layers.
    """
    dec = model.decoder
    B, L = ids.shape
    _, nf, N = frame_pos.shape
    hidden = dec.embed.weight.shape[1]
    emb = model.encoder(frames.flatten(0, 1)).view(B, nf * N, hidden)  # (B, F*N, hidden)
    if frame_tokens is not None:  # the caller's auxiliary loss reads the frame tokens
        frame_tokens.append(emb.view(B, nf, N, hidden))
    vis_idx = frame_pos.reshape(B, nf * N)
    x = dec.embed(ids.clamp(max=dec.embed.num_embeddings - 1))
    x = x.scatter(1, vis_idx[..., None].expand(-1, -1, hidden), emb.to(x.dtype))
    pos = torch.arange(L, device=ids.device).expand(B, L)
    is_vis = torch.zeros(B, L, dtype=torch.bool, device=ids.device).scatter(1, vis_idx, True)
    k = dec.k
    cos, sin = _rope_tables(dec, pos)
    for i in range(len(dec.layers)):
        if taps is not None and i in taps:
            taps[i] = x
        if i not in dec.routed or k >= N:
            if i in dec.routed and router_scores is not None and str(i) in dec.experts:
                # every token kept (r = 1, e.g. early in a keep-ratio anneal): the routers
                # still learn what to keep, for when the ratio falls
                xv = x.gather(1, vis_idx[..., None].expand(-1, -1, hidden))
                router_scores.append(dec.experts[str(i)](xv).view(B, nf, N))
            x = _block(dec, i, x, pos, (cos, sin), None)
            continue
        # Per-frame top-k of the LayerExpert's score: never across frames.
        xv = x.gather(1, vis_idx[..., None].expand(-1, -1, hidden))
        score = dec.experts[str(i)](xv).view(B, nf, N)
        if router_scores is not None:  # the caller's router loss reads them
            router_scores.append(score)
        top = kept_indices(score, k, model.cfg.mod.keep_last)  # (B, nf, k)
        kept = frame_pos.gather(2, top).reshape(B, nf * k)
        active = (~is_vis).scatter(1, kept, True)
        gate = torch.sigmoid(score.gather(2, top)).reshape(B, nf * k).to(x.dtype)
        if model.cfg.mod.gate == "straight":
            gate = 1.0 + gate - gate.detach()  # w = 1 forward, the sigmoid's gradient back
        weight = torch.ones(B, L, dtype=x.dtype, device=x.device).scatter(1, kept, gate)
        # Gather the active tokens to the front (in position order) so skipped ones cost
        # nothing; the tail of the slice holds skipped tokens, masked and left unchanged.
        m = int(active.sum(1).max())
        order = torch.argsort(torch.where(active, pos, pos + L), dim=1)[:, :m]  # (B, m)
        ok = active.gather(1, order)
        xs = x.gather(1, order[..., None].expand(-1, -1, hidden))
        rope = (cos.gather(2, _rows(order, cos)), sin.gather(2, _rows(order, sin)))
        out = _block(dec, i, xs, order, rope, ok)
        w = weight.gather(1, order)[..., None]
        new = torch.where(ok[..., None], xs + w * (out - xs), xs)
        x = x.scatter(1, order[..., None].expand(-1, -1, hidden), new)
    return x


def _rows(order: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index (B, 1, m, D) that gathers rows `order` (B, m) of a (B, 1, T, D) table."""
    return order[:, None, :, None].expand(-1, 1, -1, table.shape[-1])


def batched_logits(model: StreamingModel, ids, frames, frame_pos) -> torch.Tensor:
    """Logits (B, L, vocab) at every position (for tests; training takes only what it needs)."""
    dec = model.decoder
    return dec.lm_head(dec.final_norm(batched_hidden(model, ids, frames, frame_pos)))


# ---- the objective ----


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / RMS(x) over the last dim, without a learned scale (for heads that probe states)."""
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)


# about 1 token in 100 shows a move that has just begun (data.onset_targets)
ONSET_POS_WEIGHT = 10.0

# per-token targets, built pooled token first (data.frame_targets and its kin)
TOKEN_TARGETS = ("aux", "change", "actor", "onset")


def in_token_order(batch: dict[str, torch.Tensor], pooled_last: bool) -> dict[str, torch.Tensor]:
    """The batch's per-token targets in the model's frame-token order: data builds them with
    the pooled token first; a `pooled_last` tower emits it after the grid cells."""
    if not pooled_last:
        return batch
    return {k: torch.roll(v, -1, dims=2) if k in TOKEN_TARGETS else v for k, v in batch.items()}


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    lm: float  # mean CE of narration / answer tokens and their EOS
    aux: float  # BCE of the per-token scene targets (0 without an auxiliary head)
    stream: float  # weighted CE of the speak-or-stay-silent decision
    speak_recall: float  # speak frames where p(",") fell below the threshold
    silent_acc: float  # silent frames where p(",") stayed above it
    distill: float = 0.0  # KL from the teacher's next-token distributions (0 without one)


def compute_loss(
    model: StreamingModel,
    batch: dict[str, torch.Tensor],
    interval_id: int,
    speak_weight: float,
    threshold: float,
    aux_head: nn.Module | None = None,
    aux_weight: float = 0.5,
    change_head: nn.Module | None = None,
    router_weight: float = 0.0,
    teacher: StreamingModel | None = None,
    distill_weight: float = 0.0,
    router_target: str = "scene",
    change_mid: tuple[int, nn.Module] | tuple[int, nn.Module, str] | None = None,
    name_ids: torch.Tensor | None = None,
    name_weight: float = 1.0,
) -> LossParts:
    """VideoLLM-online's LM loss + stream loss, the speak frames weighted up; plus, with an
    auxiliary head, a per-frame scene loss on the frame tokens; plus, with a teacher (the
    full-compute twin), distillation toward its next-token distributions at the same rows."""
    dec = model.decoder
    batch = in_token_order(batch, model.cfg.vision.pooled_last)
    tokens: list[torch.Tensor] = []
    scores: list[torch.Tensor] | None = [] if router_weight > 0 else None
    taps = {change_mid[0]: None} if change_mid is not None else None
    x = batched_hidden(
        model, batch["ids"], batch["frames"], batch["frame_pos"], tokens, scores, taps
    )
    aux = torch.zeros(())
    if aux_head is not None:
        # Read through an RMS norm, so the probe cannot win by inflating the tokens...
        emb = tokens[0]
        rms = emb.float().pow(2).mean(-1, keepdim=True).sqrt()
        aux = F.binary_cross_entropy_with_logits(aux_head(emb / (rms + 1e-6)), batch["aux"])
        # ...and keep frame tokens near text-embedding scale (per-dim RMS <= VISION_RMS).
        aux = aux + F.relu(rms - VISION_RMS).pow(2).mean()
    if change_head is not None:
        fp = batch["frame_pos"].flatten(1)  # (B, F*N)
        xv = x.gather(1, fp[..., None].expand(-1, -1, x.shape[-1]))
        pred = change_head(dec.final_norm(xv)).float().view(batch["change"].shape)
        aux = aux + F.binary_cross_entropy_with_logits(pred, batch["change"])
    if change_mid is not None:
        # The same change targets read where text still reads every vision token's key (the
        # input of the last layer all of them pass, with MoD): what moved must be there, not
        # only in final states that no later layer attends to.
        layer, head, target = (*change_mid, "change")[:3]
        fp = batch["frame_pos"].flatten(1)
        xv = taps[layer].gather(1, fp[..., None].expand(-1, -1, x.shape[-1])).float()
        if target == "onset":  # rare positives, weighed up
            goal = batch["onset"]
            pred = head(rms_normalise(xv)).view(goal.shape)
            weight = torch.tensor(ONSET_POS_WEIGHT)
            aux = aux + F.binary_cross_entropy_with_logits(pred, goal, pos_weight=weight)
        else:
            pred = head(rms_normalise(xv)).view(batch["change"].shape)
            aux = aux + F.binary_cross_entropy_with_logits(pred, batch["change"])
    if scores:
        aux = aux + router_weight * router_loss(scores, batch, router_target)
    # LM loss at labelled positions only: the head runs on a few hundred rows, not all.
    lm_mask = batch["labels"] != IGNORE
    lm_logits = dec.lm_head(dec.final_norm(x[lm_mask]))
    targets = batch["labels"][lm_mask]
    if name_ids is not None and name_weight != 1.0:
        # the words that name an object (colours, shapes) weigh more: which object moved is
        # one token of a narration, and the cheapest to get wrong while the rest is right
        w = 1.0 + (name_weight - 1.0) * torch.isin(targets, name_ids).float()
        ce = F.cross_entropy(lm_logits.float(), targets, reduction="none")
        lm = (w * ce).sum() / w.sum()
    else:
        lm = F.cross_entropy(lm_logits.float(), targets)
    # Stream loss at the last <v> of every frame.
    last = batch["frame_pos"][..., -1]  # (B, F)
    xs = x.gather(1, last[..., None].expand(-1, -1, x.shape[-1]))
    s_logits = dec.lm_head(dec.final_norm(xs)).float().flatten(0, 1)  # (B*F, vocab)
    target = batch["stream_label"].flatten()
    speak = target != interval_id
    w = torch.where(speak, speak_weight, 1.0)
    ce = F.cross_entropy(s_logits, target, reduction="none")
    stream = (w * ce).sum() / w.sum()
    with torch.no_grad():
        p_int = torch.softmax(s_logits, -1)[:, interval_id]
        said = p_int < threshold
        speak_recall = float(said[speak].float().mean()) if speak.any() else 1.0
        silent_acc = float((~said[~speak]).float().mean()) if (~speak).any() else 1.0
    total = lm + stream + aux_weight * aux
    kd = torch.zeros(())
    if teacher is not None and distill_weight > 0:
        t_lm, t_stream = teacher_logits(teacher, batch, lm_mask, last)
        kd = _kl(t_lm, lm_logits.float()) + _kl(t_stream, s_logits, w)
        total = total + distill_weight * kd
    return LossParts(
        total, lm.item(), aux.item(), stream.item(), speak_recall, silent_acc, kd.item()
    )


@torch.no_grad()
def teacher_logits(
    teacher: StreamingModel,
    batch: dict[str, torch.Tensor],
    lm_mask: torch.Tensor,
    last: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits at the LM rows and at every frame's last <v> (the decision)."""
    dec = teacher.decoder
    x = batched_hidden(teacher, batch["ids"], batch["frames"], batch["frame_pos"])
    lm = dec.lm_head(dec.final_norm(x[lm_mask])).float()
    xs = x.gather(1, last[..., None].expand(-1, -1, x.shape[-1]))
    return lm, dec.lm_head(dec.final_norm(xs)).float().flatten(0, 1)


def _kl(
    teacher: torch.Tensor, student: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) per row (rows, vocab), averaged (weighted when given)."""
    if teacher.shape[0] == 0:
        return torch.zeros(())
    t = F.log_softmax(teacher, -1)
    kl = (t.exp() * (t - F.log_softmax(student, -1))).sum(-1)
    if weight is None:
        return kl.mean()
    return (weight * kl).sum() / weight.sum()


ROUTER_TARGETS = ("scene", "actor", "onset")


def router_loss(
    scores: list[torch.Tensor], batch: dict[str, torch.Tensor], target: str = "scene"
) -> torch.Tensor:
    """Teach the LayerExperts where the action is: a listwise cross-entropy over each frame's
    tokens toward the tokens that show it.

    target "scene": the cells with a moving object, every object's cell at an event frame, and
    the pooled token whenever something moves (stage 3 of the demo model). "actor": only what
    a narration is about (`data.actor_targets`): the moving objects' cells, the acting object's
    cell at an object event, the pooled token at a global one. "onset": as "scene", except on
    the frames a move has just begun (`data.onset_targets`), where only the mover's cell and
    the pooled token count: the kept tokens are then the ones a move's narration must read.

    Listwise (softmax over the frame's tokens), so it ranks tokens without moving the scores'
    level, which also gates the kept tokens' updates (sigmoid of the score).
    """
    if target not in ROUTER_TARGETS:
        raise ValueError(f"router target {target!r}: expected one of {ROUTER_TARGETS}")
    if target == "actor":
        goal = batch["actor"]  # (B, F, N)
    else:
        change = batch["change"]  # (B, F, N, CHANGE_DIM): event kinds..., moving
        present = batch["aux"][..., : len(COLOURS)].amax(-1)  # (B, F, N) an object in the cell
        event = change[..., :-1].amax(-1)  # (B, F, N) an event at this frame
        goal = torch.maximum(change[..., -1], present * event)
        if target == "onset":
            # on the frames a move has just begun, only the mover's cell and the pooled token
            onset = batch["onset"]
            goal = torch.where(onset.amax(-1, keepdim=True) > 0, onset, goal)
    mass = goal.sum(-1, keepdim=True)
    has = mass.squeeze(-1) > 0  # frames where something happens
    if not bool(has.any()):
        return torch.zeros(())
    dist = goal / mass.clamp(min=1)
    losses = [-(dist * F.log_softmax(s.float(), -1)).sum(-1)[has].mean() for s in scores]
    return torch.stack(losses).mean()
