"""The reward model: a transformer backbone and a linear head giving one score per answer.

It scores the token ids exactly as logged (prompt then response, right-padded), reading the
head at the last real token. It learns online from pairs (Bradley–Terry) and single thumbs
(pointwise logistic loss).
"""

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from flywheel.adapters import is_adapter
from trainer.config import RewardModelSettings
from trainer.distributed import SINGLE_PROCESS, Ranks
from trainer.join_store import LabelledExample, PreferencePair
from trainer.reward_math import (
    bradley_terry_loss,
    expected_calibration_error,
    last_token_indices,
    pairwise_accuracy,
    pointwise_logistic_loss,
)

SCORE_HEAD_FILE = "score_head.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def load_without_dropout(auto_class: type, path: str | Path) -> PreTrainedModel:
    """A Hugging Face model with every dropout probability in its config set to 0, in eval mode.

    Dropout would make two forward passes over the same tokens disagree: the PPO ratio would not
    start at 1 and a reward would depend on the pass. Eval mode is kept during training too;
    with no dropout it changes nothing else.
    """
    config = AutoConfig.from_pretrained(path)
    for name, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(config, name, 0.0)
    return auto_class.from_pretrained(path, config=config, dtype=torch.float32).eval()


def load_policy(path: str | Path, base_path: str | Path | None = None) -> PreTrainedModel:
    """A policy version as one model, without dropout: whole weights, or the adapter at `path`
    merged into its base at `base_path` (what the engine serves, computed once)."""
    if not is_adapter(Path(path)):
        return load_without_dropout(AutoModelForCausalLM, path)
    if base_path is None:
        raise ValueError(f"{path} holds an adapter: its base model's directory is needed to load it")
    base = load_without_dropout(AutoModelForCausalLM, base_path)
    return PeftModel.from_pretrained(base, path).merge_and_unload().eval()


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as a right-padded batch.

    Returns (input_ids, attention_mask), both `(batch, longest)` long; the mask is 1 on real
    tokens. The mask, not the pad id, marks padding, so a pad id that is also a real token is fine.
    """
    if not sequences or not all(sequences):
        raise ValueError("right_pad needs at least one sequence, and no empty one")
    longest = max(map(len, sequences))
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
    return input_ids, attention_mask


class RewardModel(nn.Module):
    """A transformer backbone with a scalar head: one score per sequence."""

    def __init__(self, backbone: PreTrainedModel, score_head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.score_head = score_head

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "RewardModel":
        """Load a backbone from any HF directory (a policy or a saved reward model).

        The head comes from `score_head.safetensors` when the directory has one; otherwise it
        is new, initialised with std 1/√(hidden + 1) so first scores are small but not all tied.
        """
        backbone = load_without_dropout(AutoModel, path)
        hidden_size = backbone.config.hidden_size
        score_head = nn.Linear(hidden_size, 1)
        head_file = Path(path) / SCORE_HEAD_FILE
        if head_file.exists():
            score_head.load_state_dict(load_file(head_file))
        else:
            nn.init.normal_(score_head.weight, std=1 / math.sqrt(hidden_size + 1))
            nn.init.zeros_(score_head.bias)
        return cls(backbone, score_head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per sequence, read at its last real token.

        input_ids, attention_mask: `(batch, seq_len)`, right-padded. Returns `(batch,)`.
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scores = self.score_head(hidden).squeeze(-1)
        return scores.gather(1, last_token_indices(attention_mask).unsqueeze(1)).squeeze(1)

    def save_pretrained(self, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write the backbone as an HF directory (safetensors) and the head beside it.

        `weights`: this model's whole state dict when its own parameters are shards (FSDP).
        """
        weights = self.state_dict() if weights is None else weights

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {name.removeprefix(prefix): tensor for name, tensor in weights.items() if name.startswith(prefix)}

        self.backbone.save_pretrained(directory, state_dict=part("backbone."))
        save_file(part("score_head."), directory / SCORE_HEAD_FILE)


class RewardModelTrainer:
    """Incremental AdamW updates of a reward model from pairs and thumbs, with evaluation.

    Under several ranks every rank takes the same update on the same labels (the reward model's
    share of the work is small beside PPO's), so the ranks' reward models stay identical; sharded
    (`ranks.parallelism` fsdp) each rank holds a slice, and every call here is a collective.
    """

    def __init__(
        self, model: RewardModel, settings: RewardModelSettings, pad_token_id: int, ranks: Ranks = SINGLE_PROCESS
    ):
        self.ranks = ranks
        self.model = ranks.shard_model(model)
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.learning_rate)

    def _scores(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.model(*right_pad(sequences, self.pad_token_id))

    def update(self, pairs: Sequence[PreferencePair], examples: Sequence[LabelledExample]) -> dict[str, float]:
        """One shuffled pass over the pairs and thumbs, `batch_size` of each per optimizer step.

        Each step minimises bradley_terry(pairs) + pointwise_loss_weight · logistic(thumbs).
        Returns the mean loss, the share of training pairs ordered right before each step,
        and the number of steps.
        """
        batch_size = self.settings.batch_size
        pairs = [pairs[i] for i in torch.randperm(len(pairs)).tolist()]
        examples = [examples[i] for i in torch.randperm(len(examples)).tolist()]
        steps = max(math.ceil(len(pairs) / batch_size), math.ceil(len(examples) / batch_size))
        losses, accuracies = [], []
        for step in range(steps):
            pair_batch = pairs[step * batch_size : (step + 1) * batch_size]
            example_batch = examples[step * batch_size : (step + 1) * batch_size]
            sequences = [pair.chosen.token_ids for pair in pair_batch] + [
                pair.rejected.token_ids for pair in pair_batch
            ]
            scores = self._scores(sequences + [example.answer.token_ids for example in example_batch])
            chosen, rejected, thumbs = scores.split([len(pair_batch), len(pair_batch), len(example_batch)])
            loss = torch.zeros(())
            if pair_batch:
                loss = loss + bradley_terry_loss(chosen, rejected)
                accuracies.append(pairwise_accuracy(chosen, rejected).item())
            if example_batch:
                labels = torch.tensor([example.thumbs_up for example in example_batch], dtype=torch.float32)
                loss = loss + self.settings.pointwise_loss_weight * pointwise_logistic_loss(thumbs, labels)
            self.optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
            self.optimizer.step()
            losses.append(loss.item())
        return {
            "loss": sum(losses) / steps if steps else math.nan,
            "train_pairwise_accuracy": sum(accuracies) / len(accuracies) if accuracies else math.nan,
            "steps": float(steps),
        }

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores of token id sequences, `(len(sequences),)`, in batches of `batch_size`."""
        size = self.settings.batch_size
        if not sequences:
            return torch.zeros(0)
        return torch.cat([self._scores(sequences[i : i + size]) for i in range(0, len(sequences), size)])

    def evaluate(self, pairs: Sequence[PreferencePair], examples: Sequence[LabelledExample]) -> dict[str, float]:
        """Held-out quality: pairwise accuracy on `pairs` and calibration error on `examples`' thumbs.

        A metric whose data is empty is NaN.
        """
        metrics = {"pairwise_accuracy": math.nan, "ece": math.nan}
        if pairs:
            chosen = self.score([pair.chosen.token_ids for pair in pairs])
            rejected = self.score([pair.rejected.token_ids for pair in pairs])
            metrics["pairwise_accuracy"] = pairwise_accuracy(chosen, rejected).item()
        if examples:
            scores = self.score([example.answer.token_ids for example in examples])
            labels = torch.tensor([example.thumbs_up for example in examples], dtype=torch.float32)
            metrics["ece"] = expected_calibration_error(scores, labels).item()
        return metrics

    def save(self, directory: Path) -> None:
        """Write the model (HF directory + score head, safetensors) and the optimizer state; only rank 0 writes."""
        weights = self.ranks.full_state_dict(self.model)
        moments = self.ranks.optimizer_state_dict(self.model, self.optimizer)
        if not self.ranks.leads:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, weights)
        torch.save(moments, directory / OPTIMIZER_FILE)

    @classmethod
    def load(
        cls, directory: Path, settings: RewardModelSettings, pad_token_id: int, ranks: Ranks = SINGLE_PROCESS
    ) -> "RewardModelTrainer":
        """A trainer resumed from `save`: same weights and optimizer moments, learning rate from `settings`."""
        trainer = cls(RewardModel.from_pretrained(directory), settings, pad_token_id, ranks)
        moments = torch.load(directory / OPTIMIZER_FILE, weights_only=True)
        ranks.load_optimizer_state_dict(trainer.model, trainer.optimizer, moments)
        for group in trainer.optimizer.param_groups:
            group["lr"] = settings.learning_rate
        return trainer
