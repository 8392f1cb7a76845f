"""PPO rollouts from a vLLM engine beside the trainer (`ppo.rollouts = "vllm"`).

On GPUs vLLM samples many times faster than transformers' generate (paged attention, continuous
batching, CUDA graphs), which is why TRL, OpenRLHF and verl roll out with it. On this project's
CPU machine it is not worth its engine (BENCHMARKS.md, "Rollouts"), so `transformers` stays the
default. The engine must answer with the policy being trained: before every rollout the policy's
current weights go in (whole weights: reloaded in place, the prefix cache reset, since cached
blocks were computed by the old weights; an adapter: written under a new LoRA id, which
vLLM's prefix cache keys apart).

Under torchrun every rank holds an engine of its own in its own process (vLLM's external launcher,
one data-parallel rank of vLLM per trainer rank) and samples its own share of the prompts; whole
weights then go to it in memory (gathered whole on every rank under FSDP), not through a file.
"""

import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from flywheel.adapters import PolicySettings, engine_max_lora_rank
from trainer.config import RolloutEngineSettings
from trainer.distributed import SINGLE_PROCESS, Ranks

WORKER_EXTENSION = "flywheel.vllm_worker.PolicyWorkerExtension"


class VLLMSampler:
    """Samples answers with a vLLM engine holding the policy's weights as of the call.

    `base_path`: the model the engine starts on (the trainer's reference: the base of an adapter).
    `sync_dir`: where an adapter (or, in one process, the whole weights) is written for the engine to
    load; under torchrun each rank has its own directory in it.
    `ranks`: the trainer's ranks; every rank must build its sampler at the same point (vLLM sets up
    its groups over them).
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        base_path: str | Path,
        eos_token_ids: frozenset[int],
        settings: RolloutEngineSettings,
        policy_settings: PolicySettings,
        sync_dir: Path,
        seed: int = 0,
        ranks: Ranks = SINGLE_PROCESS,
    ):
        from vllm import LLM

        self.policy = policy
        self.eos_token_ids = eos_token_ids
        self.sync_dir = sync_dir / f"rank-{ranks.rank}" if ranks.distributed else sync_dir
        self.ranks = ranks
        self.adapter = isinstance(policy, PeftModel)
        lora = (
            {"enable_lora": True, "max_lora_rank": engine_max_lora_rank(policy_settings.lora_rank), "max_loras": 2}
            if self.adapter
            else {}
        )
        launcher = (
            {"distributed_executor_backend": "external_launcher", "data_parallel_size": ranks.world_size}
            if ranks.distributed
            else {}
        )
        self.llm = LLM(
            model=str(base_path),
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            kv_cache_memory_bytes=settings.kv_cache_bytes or None,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager,
            seed=seed,
            worker_extension_cls=WORKER_EXTENSION,
            **lora,
            **launcher,
        )
        self.syncs = 0
        self._lora_request = None

    def sync(self) -> None:
        """Put the policy's current weights into the engine."""
        self.syncs += 1
        if self.adapter:
            from vllm.lora.request import LoRARequest

            directory = self.sync_dir / f"adapter-{self.syncs}"
            self.policy.save_pretrained(directory)
            self._lora_request = LoRARequest(f"rollout-policy-{self.syncs}", self.syncs, str(directory))
            if self.syncs > 1:  # the previous adapter answers nothing again
                self.llm.llm_engine.remove_lora(self.syncs - 1)
                shutil.rmtree(self.sync_dir / f"adapter-{self.syncs - 1}", ignore_errors=True)
            return
        if self.ranks.distributed:  # the engine runs in this process (external launcher): hand it the tensors
            weights = self.ranks.full_state_dict(self.policy, every_rank=True)
            self.llm.collective_rpc("reload_policy_weights", kwargs={"weights": list(weights.items())})
        else:
            directory = self.sync_dir / "policy"
            self.policy.save_pretrained(directory)
            self.llm.collective_rpc("reload_policy_weights", kwargs={"weights_path": str(directory)})
        self.llm.reset_prefix_cache()

    def __call__(self, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        """One answer per prompt, each ending at its first end-of-sequence token (kept) or after
        max_new_tokens, as TransformersSampler's. Each row's seed comes from torch's generator, so a
        seeded trainer samples the same answers again."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.sync()
        seeds = torch.randint(2**31 - 1, (len(prompts),)).tolist()
        params = [
            SamplingParams(
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                max_tokens=max_new_tokens,
                stop_token_ids=sorted(self.eos_token_ids),
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt) for prompt in prompts],
            params,
            lora_request=self._lora_request,
            use_tqdm=False,
        )
        return [list(output.outputs[0].token_ids) for output in outputs]

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self.sync_dir, ignore_errors=True)
