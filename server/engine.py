"""The narrow seam to vLLM: prompts in, token deltas out, weights reloaded in place.

Everything vLLM-specific in the server lives here, so the gRPC layer never touches engine types.
"""

import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from flywheel.adapters import ADAPTER_WEIGHTS_FILE, PolicySettings, adapter_name, engine_max_lora_rank
from flywheel.prompts import PromptRenderer, RenderedPrompt
from server.config import EngineSettings
from server.validation import InvalidRequest, Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationDelta:
    """What one engine step added to an answer."""

    text: str
    token_ids: list[int]
    behavior_logprobs: list[float]
    """Log-probability of each new token under the sampling distribution (after temperature, top-p, top-k)."""
    finish_reason: str | None
    """None while generating; then "stop", "length" or "abort"."""
    first_token_at: float | None = None
    """time.monotonic() when the engine produced the answer's first token, where the engine says
    (a whole answer); None where the delta's arrival is that time."""


class PolicyEngine:
    """A running vLLM async engine serving one policy: whole weights, or adapters on one base model."""

    def __init__(self, llm: AsyncLLM, model_path: str, zero_adapter_dir: Path | None = None):
        """`zero_adapter_dir`: with adapters, an adapter that adds nothing, which answers for the base."""
        self._llm = llm
        self.model_path = model_path
        self.renderer = PromptRenderer(AutoTokenizer.from_pretrained(model_path))
        self.max_model_len: int = llm.model_config.max_model_len
        self.max_prompt_chars: int = (self.max_model_len - 1) * self.renderer.max_token_chars
        """Longer text cannot fit the context, whatever its tokens: refused without tokenizing it."""
        self.kv_block_tokens: int = llm.vllm_config.cache_config.block_size
        """Tokens per KV-cache block: the prefix cache keeps whole blocks only."""
        self.prefix_caching: bool = bool(llm.vllm_config.cache_config.enable_prefix_caching)
        self.serves_adapters: bool = llm.vllm_config.lora_config is not None
        self._adapter_ids: dict[tuple[int, str], int] = {}
        self._zero_adapter_dir = zero_adapter_dir
        # vLLM's CPU LoRA path reads a request without an adapter (slot index -1) from the last slot:
        # batched with adapter requests, a base answer would be written by whichever adapter sits
        # there. So with adapters every request names one, the base an adapter that adds zero.
        self._base_adapter = (
            None
            if zero_adapter_dir is None
            else LoRARequest(
                "base-zero-adapter", self._next_adapter_id(0, str(zero_adapter_dir)), str(zero_adapter_dir)
            )
        )

    @classmethod
    def start(cls, settings: EngineSettings, model_path: str, policy: PolicySettings | None = None) -> "PolicyEngine":
        """Start the engine (tens of seconds). Call from the event loop that will use it.

        With `policy.adapter = "lora"` the engine serves `model_path` as the base and applies a
        version's adapter per request (vLLM's LoRA support, on CPU and GPU alike).
        """
        lora, zero_adapter_dir = {}, None
        if policy is not None and policy.uses_adapters:
            lora = {
                "enable_lora": True,
                "max_lora_rank": engine_max_lora_rank(policy.lora_rank),
                "max_loras": policy.max_adapters,
            }
            zero_adapter_dir = write_zero_adapter(model_path, policy, Path(tempfile.mkdtemp(prefix="zero-adapter-")))
        args = AsyncEngineArgs(
            **lora,
            model=model_path,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
            kv_cache_memory_bytes=settings.kv_cache_bytes or None,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            seed=settings.seed,
            # The sampled tokens' log-probs as the sampler saw them: the behavior policy PPO needs.
            logprobs_mode="processed_logprobs",
            enable_log_requests=False,
            worker_extension_cls="flywheel.vllm_worker.PolicyWorkerExtension",
        )
        return cls(AsyncLLM.from_engine_args(args), model_path, zero_adapter_dir)

    def sampling_params(self, sampling: Sampling, *, whole: bool = False) -> SamplingParams:
        """The engine's parameters for `sampling`; raises InvalidRequest naming the field the engine refuses."""
        try:
            return SamplingParams(
                max_tokens=sampling.max_tokens,
                min_tokens=sampling.min_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=sampling.seed,
                stop=list(sampling.stop),
                logprobs=0,
                output_kind=RequestOutputKind.FINAL_ONLY if whole else RequestOutputKind.DELTA,
            )
        except (VLLMClientError, ValueError) as refused:
            raise refused_by_engine(refused) from None

    def render_chat(self, messages: list[dict[str, str]]) -> RenderedPrompt:
        return self.renderer.chat(messages)

    def render_prompt(self, prompt: str) -> RenderedPrompt:
        return self.renderer.prompt(prompt)

    async def stream(
        self,
        request_id: str,
        prompt: RenderedPrompt,
        sampling: Sampling,
        *,
        whole: bool = False,
        adapter: tuple[int, str] | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """Generate; cancelling the consumer aborts the request inside the engine.

        `whole` yields the finished answer as one delta instead of one per engine step: a unary
        answer needs no per-token messages between the engine's output loop and the caller.
        `adapter`: (policy version, adapter directory) to answer with that version's adapter on
        the base; None answers with the engine's own weights (with adapters: through the zero adapter).
        """
        params = self.sampling_params(sampling, whole=whole)
        engine_prompt = TokensPrompt(prompt_token_ids=prompt.token_ids)
        lora_request = self._base_adapter if adapter is None else self.adapter_request(*adapter)
        try:
            async for output in self._llm.generate(engine_prompt, params, request_id, lora_request=lora_request):
                completion = output.outputs[0]
                logprobs = [
                    step[token_id].logprob for step, token_id in zip(completion.logprobs or [], completion.token_ids)
                ]
                # The engine core stamps its outputs with time.monotonic(), one clock for every process
                # (0.0 where it kept no stamp).
                first_token_at = (output.metrics.first_token_ts or None) if whole and output.metrics else None
                yield GenerationDelta(
                    text=completion.text,
                    token_ids=list(completion.token_ids),
                    behavior_logprobs=logprobs,
                    finish_reason=completion.finish_reason if output.finished else None,
                    first_token_at=first_token_at,
                )
        except VLLMClientError as refused:  # the engine checks each request against the model before queuing it
            raise refused_by_engine(refused) from None

    def unfinished_requests(self) -> int:
        return self._llm.output_processor.get_num_unfinished_requests()

    async def reload_weights(self, weights_dir: str) -> None:
        """Load new weights into the running engine, in place, and drop everything the old weights computed.

        Call with no request running (the swap drains admission first). The prefix cache keeps KV
        blocks across requests: left in place, a prompt sharing a cached prefix would be answered
        partly by the previous policy. The encoder cache holds multimodal embeddings, also computed
        by the weights (the worker clears its copy on reload; the scheduler's record of it is reset
        here). vLLM's multimodal processor caches hold preprocessed inputs, which the weights do
        not touch, so they stay.
        """
        await self._llm.collective_rpc("reload_policy_weights", kwargs={"weights_path": weights_dir})
        # reset_running_requests: a request aborted by its caller may not have left the engine yet;
        # preempting it frees its blocks, so the reset cannot be refused for blocks in use.
        await self._llm.reset_prefix_cache(reset_running_requests=True)
        await self._llm.reset_encoder_cache()

    def adapter_request(self, policy_version: int, adapter_path: str) -> LoRARequest:
        """The engine's handle on a version's adapter. vLLM knows an adapter by its integer id, so
        each (version, directory) gets its own for the engine's life: a version number that names
        other files (another registry) is never answered by the adapter loaded first. The name
        carries the id too, and the prefix cache keys blocks by name and path."""
        lora_id = self._next_adapter_id(policy_version, adapter_path)
        return LoRARequest(f"{adapter_name(policy_version)}-{lora_id}", lora_id, adapter_path)

    def _next_adapter_id(self, policy_version: int, adapter_path: str) -> int:
        return self._adapter_ids.setdefault((policy_version, adapter_path), len(self._adapter_ids) + 1)

    async def load_adapter(self, policy_version: int, adapter_path: str) -> None:
        """Load a version's adapter into the engine beside those it holds, so its first request does not
        wait for it. Nothing pauses: requests keep running on the adapters they started with.

        vLLM keeps up to max_loras adapters and evicts the least recently used; an evicted adapter
        a request names again is loaded again from its path. Its prefix-cache blocks are keyed by
        the adapter's name and path, so no version is ever answered from another's cache.
        """
        if not await self._llm.add_lora(self.adapter_request(policy_version, adapter_path)):
            raise RuntimeError(f"the engine did not load the adapter of policy version {policy_version}")

    def shutdown(self) -> None:
        self._llm.shutdown()
        if self._zero_adapter_dir is not None:
            shutil.rmtree(self._zero_adapter_dir, ignore_errors=True)


def write_zero_adapter(base_path: str, policy: PolicySettings, directory: Path) -> Path:
    """Write a LoRA adapter of `policy`'s rank and targets whose every weight is zero: applied to the
    base it changes no output. The layers' shapes come from the base's config (a model on the meta
    device: no weights are loaded)."""
    from peft import LoraConfig  # only an engine serving adapters needs peft

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in policy.target_modules:
            weights[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(policy.lora_rank, module.in_features)
            weights[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(module.out_features, policy.lora_rank)
    if not weights:
        raise ValueError(f"policy.target_modules {policy.target_modules} name no linear layer of {base_path}")
    LoraConfig(
        r=policy.lora_rank, lora_alpha=policy.lora_alpha, target_modules=policy.target_modules, task_type="CAUSAL_LM"
    ).save_pretrained(directory)
    save_file(weights, directory / ADAPTER_WEIGHTS_FILE)
    return directory


SAMPLING_FIELDS = {field.name for field in fields(Sampling)}


def refused_by_engine(refused: Exception) -> InvalidRequest:
    """vLLM's refusal of a request as an InvalidRequest on the field it names (its parameter, or its message's first word)."""
    message = str(refused.args[0]) if refused.args else "no reason given"
    parameter = getattr(refused, "parameter", None) or message.split(" ", 1)[0]
    field = f"sampling.{parameter}" if parameter in SAMPLING_FIELDS else "request"
    return InvalidRequest(field, f"the engine refuses it: {message}")
