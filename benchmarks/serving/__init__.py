"""Serving benchmark: Flywheel's gRPC `Generate` against vLLM's in-process engine and vLLM's OpenAI server.

Three systems answer the same workload on the same model with the same engine arguments:

  engine   vLLM's AsyncLLM in this process, driven through `PolicyEngine.stream(whole=True)` as `Generate` drives it (the ceiling: no RPC at all);
  flywheel `flywheel serve` in a subprocess, driven with `Generate` over a grpc.aio channel;
  openai   vLLM's OpenAI HTTP server in a subprocess, driven with POST /v1/completions over aiohttp.

Every request is the same prompt text, tokenized by each system for every request as Flywheel's `Generate`
must (the ceiling renders it per request with the server's own renderer; vLLM's OpenAI server is sent the
text, not token ids), greedy, with min_tokens == max_tokens so every answer has the same length.
Each system is started once and warmed up. Then, for several rounds, every concurrency level runs a fixed
number of requests against each system in turn, in a closed loop (each of `concurrency` workers sends its
next request when its previous one is answered). Interleaving the systems round by round spreads whatever
else the machine is doing evenly over them. Each measurement waits until every engine is idle: vLLM's engine
processes poll for a second after their last step, and an idle engine costs nothing while another is measured.

    .venv/bin/python -m benchmarks.serving [--model DIR] [--concurrency 1 8 32] [--rounds 12] [--max-tokens 64]

Prints a table, writes the raw numbers to benchmarks/results/serving.json and the `## Serving` section of
BENCHMARKS.md.
"""
