"""Code that runs inside vLLM's worker processes, mixed into vLLM's worker class.

`PolicyEngine.start` names `PolicyWorkerExtension` as the engine's `worker_extension_cls`; the
engine calls its methods with `collective_rpc`. It imports vLLM only inside the worker.
"""


class PolicyWorkerExtension:
    """Methods vLLM adds to its worker class (so `self` is the worker)."""

    def reload_policy_weights(self, weights_path: str | None = None, weights: list | None = None) -> None:
        """Load the weights in `weights_path`, or `weights` ((checkpoint name, tensor) pairs, from a
        caller in the same process), into the running model, in place, leaving nothing of the old ones.

        vLLM's in-place reload re-processes each layer that loaded weights from the checkpoint. A
        tied LM head loads none (it shares the input embeddings' weight), so on CPU it kept the
        oneDNN-packed copy of the weights the engine started with, and every swap answered with
        the old policy's head: re-process it from the weight it shares. Off CPU, or with an
        untied head that was re-processed already, this repeats a no-op or a cheap repack.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        if weights is None:
            self.reload_weights(weights_path=weights_path)
        else:
            self.reload_weights(weights_iterator=iter(weights))
        lm_head = getattr(self.model_runner.get_model(), "lm_head", None)
        quant_method = getattr(lm_head, "quant_method", None)
        # A quantized head's processing is not safe to repeat (it repacks what it packed).
        if isinstance(quant_method, UnquantizedEmbeddingMethod):
            quant_method.process_weights_after_loading(lm_head)
