"""The policy side of PPO: sample answers, score them, and take clipped updates of policy and critic.

One step (Ziegler et al. 2019; Ouyang et al. 2022), all visible in `PPOTrainer.ppo_step`:
rollout → reward-model score (minus the missing-EOS penalty) → per-token reward −β·KL plus the
score at the last token → GAE → whitened advantages → `epochs` passes of shuffled minibatches
of clipped policy and value losses → adapt β toward the KL target.

Layout: every answer is its prompt then its response, right-padded, as the server logs it. The
output at position p predicts token p + 1, so response token t of a row whose prompt has P
tokens is scored from position P − 1 + t.
"""

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from flywheel.adapters import PolicySettings, is_adapter
from trainer.config import PPOSettings
from trainer.distributed import SINGLE_PROCESS, Ranks
from trainer.ppo_math import (
    AdaptiveKLController,
    answers_to_learn_from,
    apply_missing_eos_penalty,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_per_answer,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    per_token_rewards,
)
from trainer.reward_model import load_without_dropout, right_pad

Sampler = Callable[[list[list[int]], int, float], list[list[int]]]
"""sample(prompt_token_ids, max_new_tokens, temperature) -> one response's token ids per prompt.

Sampling must be from the full softmax(logits / temperature), no top-k or top-p cut, so that
log-probs recomputed at that temperature are the behavior policy's; temperature 0 is greedy
(the safety gate's answers). A response that ended keeps its end-of-sequence token.
"""

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""score(input_ids, attention_mask) -> `(batch,)`, over right-padded prompt + response: a RewardModel.
It is called with tensors on the PPO trainer's device, so a model must live there too."""


class TransformersSampler:
    """Samples answers with `transformers` generate from the policy being trained.

    `generate`: what runs `policy.generate` when that is not the policy's own method: the sharded
    models' registered `PolicyWithValue.generate_answers`. Every rank then takes as many decoding
    steps as the others (each step gathers the layers, a collective), so answers do not stop at
    end-of-sequence: every row decodes max_new_tokens and is cut after its first end here. The
    tokens kept are drawn exactly as with early stopping; only the ones after are wasted.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        pad_token_id: int,
        eos_token_ids: frozenset[int],
        generate: Callable[..., torch.Tensor] | None = None,
    ):
        self.policy = policy
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.generate = generate or policy.generate
        # A token no model emits, so that generate never stops early; cut_after_eos still cuts.
        self.stop_ids = sorted(eos_token_ids) if generate is None else [policy.config.vocab_size]

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        longest = max(map(len, prompts))
        # Left padding, so every row's answer starts at the same column.
        device = self.policy.device
        input_ids = torch.tensor([[self.pad_token_id] * (longest - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        generated = self.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **(
                {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            ),
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_token_id,
        )
        return [cut_after_eos(row.tolist(), self.eos_token_ids) for row in generated[:, longest:]]


def end_of_sequence_ids(generation_eos: int | list[int] | None, tokenizer_eos: int | None) -> frozenset[int]:
    """Every token that ends an answer: the generation config's (chat models list several) and the tokenizer's."""
    listed = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    return frozenset(token for token in [*listed, tokenizer_eos] if token is not None)


def cut_after_eos(tokens: list[int], eos_token_ids: frozenset[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence token (all of them if none)."""
    for position, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: position + 1]
    return tokens


@dataclass(frozen=True)
class Rollout:
    """Sampled answers: row i is `response_token_ids[i]` answering `prompt_token_ids[i]`."""

    prompt_token_ids: list[list[int]]
    response_token_ids: list[list[int]]
    ended_with_eos: list[bool]
    """Whether each answer ended by itself rather than at max_new_tokens."""
    sampling_seconds: float


@dataclass(frozen=True)
class TokenBatch:
    """Answers as tensors: prompt + response right-padded, and the response part on its own.

    input_ids, attention_mask: `(answers, prompt_len + response_len)`.
    response_ids, response_mask: `(answers, response_len)`, right-padded, mask True on tokens.
    predicting_positions: `(answers, response_len)` long, the column whose output predicts each
        response token (clamped into the row on padding, whose values are masked away).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    predicting_positions: torch.Tensor

    @classmethod
    def from_rollout(cls, rollout: Rollout, pad_token_id: int) -> "TokenBatch":
        sequences = [p + r for p, r in zip(rollout.prompt_token_ids, rollout.response_token_ids)]
        input_ids, attention_mask = right_pad(sequences, pad_token_id)
        response_ids, response_mask = right_pad(rollout.response_token_ids, pad_token_id)
        prompt_lengths = torch.tensor([len(p) for p in rollout.prompt_token_ids])
        columns = torch.arange(response_ids.size(1))
        positions = (prompt_lengths.unsqueeze(1) - 1 + columns).clamp(max=input_ids.size(1) - 1)
        return cls(input_ids, attention_mask, response_ids, response_mask.bool(), positions)

    def rows(self, index: torch.Tensor) -> "TokenBatch":
        """The answers at `index` (a `(k,)` long tensor), in that order."""
        return TokenBatch(*(getattr(self, field.name)[index] for field in fields(self)))

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(*(getattr(self, field.name).to(device) for field in fields(self)))


def at_positions(per_position: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick, per row, the given columns: `(batch, seq_len, ...)` at `(batch, k)` -> `(batch, k, ...)`."""
    index = positions.view(*positions.shape, *([1] * (per_position.dim() - 2)))
    return per_position.gather(1, index.expand(*positions.shape, *per_position.shape[2:]))


class ValueHead(nn.Module):
    """The critic: a small MLP reading the policy's last hidden state, `(..., hidden)` -> `(...)`.

    Its input is detached, so value regression never pulls on the policy's weights, and it costs
    no transformer pass of its own: the policy's forward pass serves both. The output layer
    starts at zero, so the first values are 0 and the first advantages are the whitened returns.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden.detach()).squeeze(-1)

    def save(self, path: Path) -> None:
        save_file(self.state_dict(), path)

    @classmethod
    def load(cls, path: Path, hidden_size: int) -> "ValueHead":
        head = cls(hidden_size)
        head.load_state_dict(load_file(path))
        return head


def lora_policy(base: PreTrainedModel, settings: PolicySettings, adapter_dir: str | Path | None = None) -> PeftModel:
    """`base` with a trainable LoRA adapter: the one saved in `adapter_dir`, or a new one from `settings`
    (its B matrices start at zero, so it starts as the base). Only the adapter's weights train."""
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,  # as load_without_dropout: two passes over the same tokens must agree
    )
    return get_peft_model(base, config)


class PolicyWithValue(nn.Module):
    """The trainable policy, its critic (a value head on the policy's features), and the reference
    the KL penalty holds it near.

    Whole weights: the reference is a frozen copy of the starting policy. Adapter mode: the policy
    is the base with a LoRA adapter (a peft model) and the reference is the same model with the
    adapter switched off (`reference` None), so no second copy of the weights is held. The reference
    can move (`PPOTrainer.anchor_policy`): whole weights load into the copy; an adapter reference is
    a frozen set of adapter weights (`reference_adapter`), swapped into the policy's adapter for the
    reference's passes.
    """

    def __init__(self, policy: PreTrainedModel, critic: ValueHead, reference: PreTrainedModel | None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.reference = None if reference is None else reference.requires_grad_(False)
        self.reference_adapter: dict[str, torch.Tensor] | None = None
        """Adapter mode: the reference's adapter weights as peft saves them; None: no adapter (the base)."""

    @classmethod
    def from_pretrained(
        cls, policy_path: str | Path, policy_settings: PolicySettings | None = None
    ) -> "PolicyWithValue":
        """Start from the whole-weight policy at `policy_path`; with adapters, a new adapter on it."""
        policy = load_without_dropout(AutoModelForCausalLM, policy_path)
        if policy_settings is not None and policy_settings.uses_adapters:
            return cls(lora_policy(policy, policy_settings), ValueHead(policy.config.hidden_size), None)
        return cls(policy, ValueHead(policy.config.hidden_size), copy.deepcopy(policy))

    @classmethod
    def resume(cls, policy_dir: str | Path, reference_path: str | Path, critic: ValueHead | None) -> "PolicyWithValue":
        """The policy saved in `policy_dir` (whole weights, or an adapter on `reference_path`) against its reference."""
        reference = load_without_dropout(AutoModelForCausalLM, reference_path)
        if is_adapter(Path(policy_dir)):
            policy = PeftModel.from_pretrained(reference, policy_dir, is_trainable=True)
            return cls(policy, critic or ValueHead(reference.config.hidden_size), None)
        policy = load_without_dropout(AutoModelForCausalLM, policy_dir)
        return cls(policy, critic or ValueHead(policy.config.hidden_size), reference)

    @property
    def uses_adapter(self) -> bool:
        return isinstance(self.policy, PeftModel)

    @staticmethod
    def response_hidden(model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
        """The last hidden state at the column predicting each response token, `(answers, response_len, hidden)`."""
        # A peft model's `base_model` is its tuner; the transformer body (LoRA layers inside) is one further.
        causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
        hidden = causal_lm.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return at_positions(hidden, batch.predicting_positions)

    def reference_logits(self, batch: TokenBatch) -> torch.Tensor:
        """The reference policy's logits for each response token, `(answers, response_len, vocab)`."""
        if self.reference is not None:
            return self.response_logits(self.reference, batch)
        if self.reference_adapter is None:
            with self.policy.disable_adapter():
                return self.response_logits(self.policy, batch)
        own = {name: weight.clone() for name, weight in self.adapter_weights().items()}
        set_peft_model_state_dict(self.policy, self.reference_adapter)
        try:
            return self.response_logits(self.policy, batch)
        finally:
            set_peft_model_state_dict(self.policy, own)

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """The policy adapter's weights as peft saves them (views of the parameters, not copies)."""
        return get_peft_model_state_dict(self.policy, save_embedding_layers=False)

    @classmethod
    def response_logits(cls, model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
        """Logits predicting each response token, `(answers, response_len, vocab)`.

        The LM head runs only on the response positions: on a real vocabulary the logits of
        every prompt position would dominate memory.
        """
        return model.get_output_embeddings()(cls.response_hidden(model, batch))

    FSDP_METHODS = ("reference_logits", "generate_answers")
    """Methods besides `forward` that run the models: sharded (FSDP), they gather parameters around these too."""

    def generate_answers(self, **generate_kwargs) -> torch.Tensor:
        """The policy's `generate`, through a method the sharded models gather their parameters around."""
        return self.policy.generate(**generate_kwargs)

    def forward(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """What PPO trains, in one call (the call DistributedDataParallel syncs gradients through):
        the policy's logits for each response token, `(answers, response_len, vocab)`, and the
        critic's value of the state before each response token, `(answers, response_len)`."""
        hidden = self.response_hidden(self.policy, batch)
        return self.policy.get_output_embeddings()(hidden), self.critic(hidden)


@dataclass(frozen=True)
class PPOStepStats:
    """What one PPO step did; per-answer quantities are means over the rollout's answers."""

    mean_score: float
    """Reward-model score before the missing-EOS penalty."""
    mean_reward: float
    """Σ over tokens of the per-token reward: penalised score − β·KL."""
    kl_to_reference: float
    """Σ over tokens of log π − log π_ref at rollout time, nats per answer."""
    kl_coef: float
    """β used in this step's rewards (the controller adapts it afterwards)."""
    approx_kl: float
    """KL(π_old ‖ π_θ) per token across the updates, mean over minibatches (k3)."""
    clip_fraction: float
    entropy: float
    """Policy entropy per response token at rollout time, nats."""
    value_loss: float
    value_clip_fraction: float
    """Share of tokens whose value prediction moved past value_clip_eps across the updates, mean over minibatches."""
    explained_variance: float
    """Of the returns by the critic's rollout-time values; 1 is perfect."""
    first_minibatch_ratio: float
    """Mean π_θ / π_old on the first minibatch, before any update: exactly 1 if old log-probs are right."""
    ended_with_eos_fraction: float
    learning_answer_fraction: float
    """Share of the answers the policy's update learnt from (see `ppo.min_reward_spread`); the critic learns from all."""
    mean_response_tokens: float
    seconds: float
    """Wall-clock time of `ppo_step` (scoring and updates; sampling is in the Rollout)."""
    tokens_per_second: float
    """The rollout's response tokens per second of `ppo_step`."""


class PPOTrainer:
    """Runs PPO steps on a PolicyWithValue: optimizers for policy and critic, and the KL coefficient.

    Under torchrun, pass `ranks` (trainer.distributed.init_ranks): each rank then samples and
    trains on its share of every step's prompts and of every minibatch, with gradients averaged
    over ranks (see trainer/distributed.py). The default is one process. The models are moved to
    `ranks.device`, where every batch is built. Sharded (FSDP), every method here that touches
    weights is a collective: every rank calls it, in the same order.
    """

    def __init__(
        self,
        models: PolicyWithValue,
        tokenizer: PreTrainedTokenizerBase,
        settings: PPOSettings,
        sampler: Sampler | None = None,
        ranks: Ranks = SINGLE_PROCESS,
    ):
        self.models = models
        self.tokenizer = tokenizer
        self.settings = settings
        self.ranks = ranks
        self.device = ranks.device
        self.trainable = ranks.wrap(models.to(self.device), PolicyWithValue.FSDP_METHODS)
        self.minibatch_size = ranks.share(settings.minibatch_size, "ppo.minibatch_size")
        """Answers per gradient step on this rank; `settings.minibatch_size` over all ranks."""
        self.eos_token_ids = end_of_sequence_ids(models.policy.generation_config.eos_token_id, tokenizer.eos_token_id)
        self.sampler = sampler or TransformersSampler(
            models.policy,
            tokenizer.pad_token_id,
            self.eos_token_ids,
            generate=models.generate_answers if ranks.sharded else None,
        )
        # fused: one kernel per step over all parameters, instead of several per parameter tensor.
        # With an adapter only its weights require gradients; whole weights all do.
        self.policy_optimizer = torch.optim.AdamW(
            [p for p in models.policy.parameters() if p.requires_grad],
            lr=settings.adapter_learning_rate if models.uses_adapter else settings.policy_learning_rate,
            fused=True,
        )
        self.critic_optimizer = torch.optim.AdamW(
            models.critic.parameters(), lr=settings.critic_learning_rate, fused=True
        )
        self.kl_controller = AdaptiveKLController(settings.init_kl_coef, settings.target_kl, settings.kl_horizon)

    def rollout(self, prompts: Sequence[Sequence[int]]) -> Rollout:
        """Sample `responses_per_prompt` answers to each of this rank's share of `prompts` (all of
        them in one process); a prompt's answers are adjacent rows."""
        repeated = [
            list(prompt) for prompt in self.ranks.shard(prompts) for _ in range(self.settings.responses_per_prompt)
        ]
        started = time.perf_counter()
        responses = self.sampler(repeated, self.settings.max_new_tokens, self.settings.temperature)
        seconds = time.perf_counter() - started
        if any(not response for response in responses):
            raise ValueError("the sampler returned an empty response; every answer needs at least one token")
        ended = [response[-1] in self.eos_token_ids for response in responses]
        return Rollout(repeated, responses, ended, seconds)

    def _minibatches(self, answers: int, shuffle: bool) -> list[torch.Tensor]:
        order = torch.randperm(answers, device=self.device) if shuffle else torch.arange(answers, device=self.device)
        return list(order.split(self.minibatch_size))

    def ppo_step(self, rollout: Rollout, reward_model: Scorer) -> PPOStepStats:
        """Score the rollout and take `epochs` passes of clipped PPO updates over it.

        Returns this rank's statistics; `self.ranks.reduce_stats` gives them over all ranks.
        """
        started = time.perf_counter()
        s, models = self.settings, self.models
        # Shuffle once up front and walk the first epoch in order: the rollout-time passes below
        # then see exactly the first epoch's minibatches, so its ratio is bitwise 1.
        shuffled = torch.randperm(len(rollout.response_token_ids), device=self.device)
        batch = TokenBatch.from_rollout(rollout, self.tokenizer.pad_token_id).to(self.device).rows(shuffled)
        ended_with_eos = torch.tensor(rollout.ended_with_eos, device=self.device)[shuffled]
        mask = batch.response_mask

        with torch.no_grad():
            old_logprobs, ref_logprobs, old_values, entropy, scores = [], [], [], [], []
            for index in self._minibatches(len(shuffled), shuffle=False):
                minibatch = batch.rows(index)
                logits, values = models(minibatch)
                old_logprobs.append(logprobs_from_logits(logits, minibatch.response_ids, s.temperature))
                entropy.append(entropy_from_logits(logits, s.temperature))
                ref_logits = models.reference_logits(minibatch)
                ref_logprobs.append(logprobs_from_logits(ref_logits, minibatch.response_ids, s.temperature))
                old_values.append(values)
                scores.append(reward_model(minibatch.input_ids, minibatch.attention_mask))
            old_logprobs, ref_logprobs, old_values, entropy, scores = map(
                torch.cat, (old_logprobs, ref_logprobs, old_values, entropy, scores)
            )
            penalised_scores = apply_missing_eos_penalty(scores, ended_with_eos, s.missing_eos_penalty)
            kl_coef = self.kl_controller.kl_coef
            rewards = per_token_rewards(penalised_scores, old_logprobs, ref_logprobs, mask, kl_coef)
            advantages, returns = gae_advantages(rewards, old_values, mask, s.gamma, s.lam)
            in_rollout_order = torch.empty_like(penalised_scores).index_copy_(0, shuffled, penalised_scores)
            learns = answers_to_learn_from(in_rollout_order, s.responses_per_prompt, s.min_reward_spread)[shuffled]
            learning = mask & learns.unsqueeze(1)
            # The rest keep advantage 0: in the loss, their tokens push the policy nowhere.
            advantages = masked_whiten(advantages, learning) if learning.sum() > 1 else torch.zeros_like(advantages)
            kl_to_reference = kl_per_answer(old_logprobs, ref_logprobs, mask).mean().item()

        update_stats = []
        for epoch in range(s.epochs):
            for index in self._minibatches(len(shuffled), shuffle=epoch > 0):
                minibatch = batch.rows(index)
                logits, values = self.trainable(minibatch)
                logprobs = logprobs_from_logits(logits, minibatch.response_ids, s.temperature)
                policy_loss, policy_stats = clipped_policy_loss(
                    logprobs, old_logprobs[index], advantages[index], mask[index], s.clip_eps
                )
                value_loss, value_stats = clipped_value_loss(
                    values, old_values[index], returns[index], mask[index], s.value_clip_eps
                )
                self.policy_optimizer.zero_grad()
                self.critic_optimizer.zero_grad()
                # Separate models and optimizers: the sum only saves a second backward call.
                (policy_loss + value_loss).backward()
                nn.utils.clip_grad_norm_(models.policy.parameters(), s.max_grad_norm)
                nn.utils.clip_grad_norm_(models.critic.parameters(), s.max_grad_norm)
                self.policy_optimizer.step()
                self.critic_optimizer.step()
                update_stats.append({**policy_stats, **value_stats, "value_loss": value_loss.detach()})

        # β steers by the KL of every rank's answers, so it stays the same on all ranks.
        self.kl_controller.update(self.ranks.mean(kl_to_reference), len(shuffled) * self.ranks.world_size)
        seconds = time.perf_counter() - started
        response_tokens = int(mask.sum())

        def mean_over_updates(name: str) -> float:
            return torch.stack([stats[name] for stats in update_stats]).mean().item()

        return PPOStepStats(
            mean_score=scores.mean().item(),
            mean_reward=torch.where(mask, rewards, 0.0).sum(-1).mean().item(),
            kl_to_reference=kl_to_reference,
            kl_coef=kl_coef,
            approx_kl=mean_over_updates("approx_kl"),
            clip_fraction=mean_over_updates("clip_fraction"),
            entropy=masked_mean(entropy, mask).item(),
            value_loss=mean_over_updates("value_loss"),
            value_clip_fraction=mean_over_updates("value_clip_fraction"),
            explained_variance=explained_variance(old_values, returns, mask).item(),
            first_minibatch_ratio=update_stats[0]["ratio_mean"].item(),
            ended_with_eos_fraction=ended_with_eos.float().mean().item(),
            learning_answer_fraction=learns.float().mean().item(),
            mean_response_tokens=response_tokens / len(shuffled),
            seconds=seconds,
            tokens_per_second=response_tokens / seconds,
        )

    def restart_policy(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the policy's weights (e.g. with the live policy's) and forget the optimizer's moments.

        With an adapter, `weights` are an adapter's as peft saves them (empty: back to the base).
        """
        if self.models.uses_adapter:
            adapter = self.models.policy
            for name, parameter in adapter.named_parameters():
                if "lora_B" in name:  # B = 0: the adapter adds nothing until the saved weights land
                    nn.init.zeros_(parameter)
            if weights:
                set_peft_model_state_dict(adapter, weights)
        else:
            self.ranks.load_full_state_dict(self.models.policy, weights)
        self.policy_optimizer.state.clear()

    def anchor_policy(self, weights: dict[str, torch.Tensor]) -> None:
        """Make `weights` the reference the KL penalty holds the policy near (e.g. the live policy's, so that
        each step moves from what users approved, not from where training began). As `restart_policy`,
        with an adapter `weights` are an adapter's (empty: the base, no adapter)."""
        if self.models.uses_adapter:
            if weights and weights.keys() != (own := self.models.adapter_weights()).keys():
                raise ValueError(
                    f"the KL penalty's reference adapter holds other weights than the policy's adapter "
                    f"({sorted(weights.keys() ^ own.keys())[:3]}...): were policy.lora_rank or target_modules changed? "
                    "A changed adapter takes a fresh trainer state"
                )
            self.models.reference_adapter = {name: weight.clone() for name, weight in weights.items()} or None
        else:
            self.ranks.load_full_state_dict(self.models.reference, weights)

    def save_policy(self, directory: Path) -> None:
        """Write the policy as a directory vLLM can serve: whole weights as a Hugging Face model
        (safetensors weights, config, generation config, tokenizer and chat template), or the
        adapter alone (adapter_config.json and adapter_model.safetensors), which applies to the base.
        Only rank 0 writes."""
        if self.models.uses_adapter:
            if self.ranks.leads:
                self.models.policy.save_pretrained(directory)
                (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model card template, not the model
            return
        weights = self.ranks.full_state_dict(self.models.policy)
        if self.ranks.leads:
            self.models.policy.save_pretrained(directory, state_dict=weights)
            self.tokenizer.save_pretrained(directory)

    def save_critic(self, path: Path) -> None:
        """Write the value head's weights (safetensors); only rank 0 writes."""
        weights = self.ranks.full_state_dict(self.models.critic)
        if self.ranks.leads:
            save_file(weights, path)

    def optimizer_states(self) -> dict[str, dict]:
        """The policy's and critic's AdamW moments, to write to a checkpoint (whole on rank 0 when sharded)."""
        return {
            "policy": self.ranks.optimizer_state_dict(self.models, self.policy_optimizer),
            "critic": self.ranks.optimizer_state_dict(self.models, self.critic_optimizer),
        }

    def load_optimizer_states(self, states: dict[str, dict]) -> None:
        """Resume the moments `optimizer_states` returned (every rank passes the same)."""
        self.ranks.load_optimizer_state_dict(self.models, self.policy_optimizer, states["policy"])
        self.ranks.load_optimizer_state_dict(self.models, self.critic_optimizer, states["critic"])
