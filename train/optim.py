"""Optimizers of the training loop: AdamW alone, or Muon for the hidden matrices with AdamW for
the rest.

Muon (torch.optim.Muon) orthogonalises each update of a 2-D weight with a Newton-Schulz
iteration; it is meant for the matrices inside the blocks. Embeddings (and so a tied output
layer), norms, an untied lm_head and MoE routers stay on AdamW. Each group has its own
learning rate: the trainer's schedule multiplies every group's `lr_scale` (Muon's is
muon_lr / lr), so one schedule drives both optimizers.
"""

from __future__ import annotations

from typing import Any

import torch

from config import TrainConfig

# The projections of attention and SwiGLU (dense, routed experts and the shared expert): the
# hidden matrices that Muon trains. The router (`mlp.gate.weight`) and the shared expert's
# one-row gate are left to AdamW: they are classifiers, not hidden maps.
MUON_SUFFIXES = tuple(f"{name}.weight" for name in
                      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
MUON_MOMENTUM = 0.95


def muon_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters that --optimizer muon gives to Muon: the 2-D attention
    and MLP projections of the blocks. Everything else (embeddings, norms, lm_head, routers)
    goes to AdamW."""
    embedding = getattr(getattr(model, "embed_tokens", None), "weight", None)
    return [name for name, param in model.named_parameters()
            if param.requires_grad and param.dim() == 2 and param is not embedding
            and name.startswith("layers.") and name.endswith(MUON_SUFFIXES)]


class MuonWithAdamW:
    """Muon and AdamW stepped together, seen by the trainer (and GradScaler) as one optimizer:
    param_groups lists both optimizers' groups (the schedule sets each group's lr),
    state_dict() saves both, keyed by name, so a checkpoint restores both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer, muon_lr_scale: float):
        self.optimizers = {"muon": muon, "adamw": adamw}
        self.muon_lr_scale = muon_lr_scale
        self._set_lr_scale()

    def _set_lr_scale(self) -> None:
        # The schedule sets group lr = schedule value (which peaks at cfg.lr) * lr_scale. Set
        # again after a load: the run's --muon-lr wins over the one saved in the checkpoint.
        for group in self.optimizers["muon"].param_groups:
            group["lr_scale"] = self.muon_lr_scale

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure: compute the loss and backward first")
        for optimizer in self.optimizers.values():
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != set(self.optimizers):
            held = "plain AdamW state" if isinstance(state, dict) and "param_groups" in state else "another layout"
            raise ValueError(f"the saved optimizer state is {held}, but this run uses --optimizer muon "
                             "(Muon + AdamW); resume with the --optimizer the run was started with, "
                             "or pass --no-resume to start over")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])
        self._set_lr_scale()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool):
    """The optimizer for cfg.optimizer over the model's trainable parameters: torch AdamW
    (model.optimizer_groups: matrices decay, norms and embeddings do not), or MuonWithAdamW."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=cfg.lr,
                                 betas=(cfg.beta1, cfg.beta2), fused=fused)
    names = set(muon_parameter_names(model))
    if not names:
        raise ValueError("--optimizer muon found no trainable attention/MLP matrices to train (a LoRA run "
                         "trains adapters only); use --optimizer adamw")
    muon_params = [p for n, p in model.named_parameters() if n in names]
    muon_ids = {id(p) for p in muon_params}
    adamw_groups = []
    for group in model.optimizer_groups(cfg.weight_decay):
        rest = [p for p in group["params"] if id(p) not in muon_ids]
        if rest:
            adamw_groups.append({**group, "params": rest})
    muon = torch.optim.Muon(muon_params, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                            momentum=MUON_MOMENTUM, nesterov=True)
    adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return MuonWithAdamW(muon, adamw, muon_lr_scale=cfg.muon_lr / cfg.lr)
