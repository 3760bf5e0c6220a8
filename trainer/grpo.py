"""One GRPO-family optimisation step over validated groups.

The trainer keeps fp32 master weights and computes in the pool's dtype under autocast, so small
updates are not rounded away in bf16, while the weights it publishes (cast to the pool's dtype)
are exactly what nodes generate with and validators recompute with.

Under torch.distributed (FSDP2, trainer.distributed) every rank gets the whole batch and trains
on its share of the sequences; the loss keeps the whole batch's normaliser and is scaled by the
world size, so FSDP's gradient averaging yields the gradient one process would compute.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from toploc.capture_hf import shared_prompt_logits
from trainer.config import AlgorithmSection
from trainer.loss import LossConfig, batch_normaliser, policy_loss
from trainer.off_policy import mismatch_kl_sum
from trainer.schedule import schedule_of


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    tokens: list[int]
    behaviour_logprobs: list[float]
    truncated: bool
    """Ended at the length cap rather than with EOS."""
    loss_mask: list[bool] | None = None
    """Per token, whether it carries loss: a multi-turn transcript's environment replies are
    context, not the policy's actions. None: every token does."""


@dataclass(frozen=True)
class TrainGroup:
    """G samples of one prompt with their coordinator-computed rewards and the advantages the
    group algorithm gave them (trainer.algorithm)."""

    samples: list[Sample]
    rewards: list[float]
    advantages: list[float]
    weight_version: int
    group_id: int = -1


@dataclass
class StepResult:
    metrics: dict[str, float]
    trained: list[int]
    """Group ids the step learned from."""


class GRPOTrainer:
    def __init__(
        self,
        model: PreTrainedModel,
        algorithm: AlgorithmSection,
        temperature: float,
        max_new_tokens: int,
        compute_dtype: torch.dtype = torch.float32,
        pad_token_id: int = 0,
        ref_model: PreTrainedModel | None = None,
    ) -> None:
        self.model = model.float().train()
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        )
        self.algorithm = algorithm
        self.temperature = temperature
        self.compute_dtype = compute_dtype
        self.pad_token_id = pad_token_id
        self.ref_model = ref_model
        if algorithm.beta > 0 and ref_model is None:
            raise ValueError("beta > 0 needs a frozen reference model")
        self.loss_config = LossConfig(
            loss_type=algorithm.loss_type,
            epsilon_low=algorithm.epsilon_low,
            epsilon_high=algorithm.epsilon_high,
            delta=algorithm.delta,
            beta=algorithm.beta,
            entropy_coef=algorithm.entropy_coef,
            is_cap=algorithm.is_cap,
            max_completion_len=max_new_tokens,
            off_policy=algorithm.off_policy,
            tis_cap=algorithm.tis_cap,
            icepop_low=algorithm.icepop_low,
            icepop_high=algorithm.icepop_high,
        )
        # Frozen weights (a LoRA base) get no optimizer state. The fused kernel (one pass over
        # each tensor instead of a dozen elementwise ops) made SmolLM2's AdamW step several times
        # faster on CPU (docs/learning.md); FSDP2's sharded weights keep torch's default.
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=algorithm.lr,
            weight_decay=algorithm.weight_decay,
            fused=True if self.world == 1 else None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule_of(algorithm))

    def set_lr(self, lr: float) -> None:
        """Use `lr` as the base learning rate from now on (the schedule still scales it)."""
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        factors = self.scheduler.lr_lambdas
        step = self.scheduler.last_epoch
        for group, factor in zip(self.optimizer.param_groups, factors, strict=True):
            group["lr"] = lr * factor(step)

    def step(self, groups: list[TrainGroup], current_version: int) -> StepResult:
        """One optimizer step on `groups` (at least one), with their stored advantages."""
        if not groups:
            raise ValueError("a step needs at least one group")
        t0 = time.perf_counter()
        # flat: groups may differ in size (`sampling.max_group_size`)
        rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
        staleness = [current_version - g.weight_version for g in groups]
        metrics: dict[str, float] = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "groups": float(len(groups)),
            "staleness_mean": sum(staleness) / len(staleness),
            "staleness_max": float(max(staleness)),
            "lr": self.scheduler.get_last_lr()[0],
        }
        lengths = [len(s.tokens) for g in groups for s in g.samples]
        metrics["completion_len_mean"] = sum(lengths) / len(lengths)
        metrics["completion_len_max"] = float(max(lengths))
        metrics["completion_clipped_frac"] = sum(
            s.truncated for g in groups for s in g.samples
        ) / len(lengths)
        samples = [
            (s, float(a)) for g in groups for s, a in zip(g.samples, g.advantages, strict=True)
        ]
        device = self._device()
        batch = {k: v.to(device) for k, v in self._batch([s for s, _ in samples]).items()}
        mask = batch["mask"]
        if self.algorithm.mask_truncated:
            truncated = torch.tensor([s.truncated for s, _ in samples], device=device)
            mask = mask * (~truncated).float()[:, None]
        normaliser = batch_normaliser(self.loss_config, mask)
        adv = torch.tensor([a for _, a in samples], device=device)
        # Groups generated with the current weights: any gap between the nodes' logprobs and
        # ours on them is numerics (dtype, kernels), not lag.
        fresh = torch.tensor(
            [float(g.weight_version == current_version) for g in groups for _ in g.samples],
            device=device,
        )

        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for part, weight in self._passes(len(samples)):
            logp, entropy = self._logprobs(self.model, batch, part, need_entropy=True)
            # The proximal policy is the weights at the step's start; a step makes one optimizer
            # update, so those are the weights of this very forward: its logprobs, detached,
            # are the proximal logprobs, with no second forward pass.
            prox = logp.detach()
            ref = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref, _ = self._logprobs(self.ref_model, batch, part, need_entropy=False)
            loss, stats = policy_loss(
                logp,
                batch["behaviour"][part],
                adv[part],
                mask[part],
                self.loss_config,
                normaliser,
                ref_logp=ref,
                entropy=entropy,
                prox_logp=prox,
            )
            stats["mismatch_kl_sum"] = mismatch_kl_sum(
                batch["behaviour"][part], prox, batch["mask"][part] * fresh[part, None]
            )
            stats["fresh_tokens"] = float((batch["mask"][part] * fresh[part, None]).sum())
            (loss * weight * self.world).backward()
            if weight == 0.0:
                continue  # a pass that only keeps this rank in step with the others
            loss_sum += float(loss.detach())
            for k, v in stats.items():
                totals[k] = max(totals.get(k, v), v) if k == "ratio_max" else totals.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad],
            self.algorithm.grad_clip if self.algorithm.grad_clip > 0 else math.inf,
        )
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        loss_sum, totals = self._reduce(loss_sum, totals)

        tokens = max(totals["tokens"], 1.0)
        elapsed = time.perf_counter() - t0
        metrics.update(
            policy_loss=loss_sum,
            grad_norm=float(grad_norm),
            entropy=totals["entropy_sum"] / tokens,
            kl=totals["kl_sum"] / tokens,
            clip_low_frac=totals["clipped_low_tokens"] / tokens,
            clip_high_frac=totals["clipped_high_tokens"] / tokens,
            is_masked_frac=totals["masked_tokens"] / tokens,
            icepop_masked_frac=totals["icepop_masked_tokens"] / tokens,
            tis_weight_mean=totals["tis_weight_sum"] / max(totals["live_tokens"], 1.0),
            ratio_mean=totals["ratio_sum"] / tokens,
            ratio_max=totals["ratio_max"],
            tokens=totals["tokens"],
            tokens_per_s=totals["tokens"] / elapsed,
            step_time_s=elapsed,
        )
        if totals["fresh_tokens"] > 0:  # no staleness-0 group: nothing to compare, no value
            metrics["mismatch_kl"] = totals["mismatch_kl_sum"] / totals["fresh_tokens"]
        return StepResult(metrics, [g.group_id for g in groups])

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _passes(self, n: int) -> list[tuple[torch.Tensor, float]]:
        """This rank's micro-batches (index tensors) with a weight: every rank makes the same
        number of forward/backward passes, since FSDP2 gathers weights collectively in each; a
        rank short of sequences repeats sequence 0 with weight 0."""
        mine = list(range(self.rank, n, self.world))
        mb = self.algorithm.micro_batch
        count = math.ceil(math.ceil(n / self.world) / mb)
        out = []
        for k in range(count):
            idx = mine[k * mb : (k + 1) * mb]
            out.append((torch.tensor(idx or [0], device=self._device()), 1.0 if idx else 0.0))
        return out

    def _reduce(self, loss_sum: float, totals: dict[str, float]) -> tuple[float, dict[str, float]]:
        """Sum the ranks' statistics (max for ratio_max): metrics describe the whole batch."""
        if self.world == 1:
            return loss_sum, totals
        keys = sorted(k for k in totals if k != "ratio_max")
        sums = torch.tensor([loss_sum] + [totals.get(k, 0.0) for k in keys], dtype=torch.float64)
        peak = torch.tensor([totals.get("ratio_max", 0.0)], dtype=torch.float64)
        # On NCCL the tensors must live on the GPU; gloo takes them on the CPU.
        device = self._device()
        sums, peak = sums.to(device), peak.to(device)
        dist.all_reduce(sums)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        reduced = dict(zip(keys, sums[1:].tolist(), strict=True))
        reduced["ratio_max"] = float(peak[0])
        return float(sums[0]), reduced

    def _batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Right-padded prompt+completion ids with each sample's prompt and total length, and
        over the target window (the positions from the shortest prompt's last token on, whose
        next tokens can be completion tokens): the completion mask and the behaviour
        logprobs. Window column j predicts ids[start + j + 1]."""
        width = max(len(s.prompt_ids) + len(s.tokens) for s in samples)
        start = min(len(s.prompt_ids) for s in samples) - 1
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), width - 1 - start))
        behaviour = torch.zeros((len(samples), width - 1 - start))
        for i, s in enumerate(samples):
            p, n = len(s.prompt_ids), len(s.tokens)
            ids[i, : p + n] = torch.tensor(s.prompt_ids + s.tokens)
            # completion token t sits at p + t, predicted at window column p - 1 - start + t
            mask[i, p - 1 - start : p - 1 - start + n] = (
                1.0 if s.loss_mask is None else torch.tensor(s.loss_mask, dtype=mask.dtype)
            )
            behaviour[i, p - 1 - start : p - 1 - start + n] = torch.tensor(s.behaviour_logprobs)
        return {
            "ids": ids,
            "mask": mask,
            "behaviour": behaviour,
            "prompt_len": torch.tensor([len(s.prompt_ids) for s in samples]),
            "length": torch.tensor([len(s.prompt_ids) + len(s.tokens) for s in samples]),
        }

    def _logprobs(
        self,
        model: PreTrainedModel,
        batch: dict[str, torch.Tensor],
        part: torch.Tensor,
        need_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per target position: logprob of the actual next token under softmax(logits / T) (the
        same quantity as `toploc.token_logprobs`, which nodes report), and the entropy; 0 at
        window positions that predict no completion token (the mask drops them).

        The forward is `shared_prompt_logits`: each distinct prompt of the micro-batch runs
        once and its KV cache is copied to the group's samples (gradients flow back through
        the copies), and logits come only for completion positions. A group's samples share
        their prompt, so a micro-batch of two groups of 8 runs 2 prompts, not 16: on SmolLM2's
        chat template the prompt is most of a rollout's tokens."""
        ids = batch["ids"][part]
        prompt_len, length = batch["prompt_len"][part].tolist(), batch["length"][part].tolist()
        window = batch["mask"].shape[1]
        start = ids.shape[1] - 1 - window
        rows = ids.tolist()
        prompts = [row[:p] for row, p in zip(rows, prompt_len, strict=True)]
        completions = [row[p:n] for row, p, n in zip(rows, prompt_len, length, strict=True)]
        autocast = (
            torch.autocast(device_type=ids.device.type, dtype=self.compute_dtype)
            if self.compute_dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            logits, _ = shared_prompt_logits(model, prompts, completions, self.pad_token_id)
        t = self.temperature if self.temperature > 0 else 1.0
        log_probs = torch.log_softmax(logits.float() / t, dim=-1)
        chosen = torch.zeros(logits.shape[:2], dtype=torch.int64, device=logits.device)
        for i, c in enumerate(completions):
            chosen[i, : len(c)] = torch.as_tensor(c, device=logits.device)
        per_token = log_probs.gather(-1, chosen[:, :, None]).squeeze(-1)
        logp = _to_window(per_token, prompt_len, completions, start, window)
        entropy = None
        if need_entropy:
            # Entropy is only logged unless the bonus is on: keep it out of the graph then.
            with torch.set_grad_enabled(
                self.loss_config.entropy_coef > 0 and torch.is_grad_enabled()
            ):
                per_entropy = -(log_probs.exp() * log_probs).sum(-1)
                entropy = _to_window(per_entropy, prompt_len, completions, start, window)
        return logp, entropy


def _to_window(
    values: torch.Tensor,
    prompt_len: list[int],
    completions: list[list[int]],
    start: int,
    width: int,
) -> torch.Tensor:
    """Per-completion-token `values` ([samples, longest completion]) laid out on the batch's
    target window: completion token t of a sample with prompt length p is predicted at
    window column p - 1 - start + t. Columns predicting no completion token are 0."""
    rows = []
    for i, (p, c) in enumerate(zip(prompt_len, completions, strict=True)):
        before = p - 1 - start
        rows.append(torch.nn.functional.pad(values[i, : len(c)], (before, width - before - len(c))))
    return torch.stack(rows)
